"""What the operations commands (``aioredmq stats``, ``peek``, ``dead``) read and change,
as plain data: the CLI prints it as tables or JSON; a program may call it directly.

A name is a queue, a stream or a partitioned queue, known by its keys under the prefix;
``<name>#<i>`` is partition ``i`` of the partitioned queue ``<name>``. A name without
keys is an error that lists the names there are, so a typo never reads as an empty queue.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .client import Client
from .commands import execute
from .envelope import DeadRecord, decode
from .errors import ConfigError, DecodeError, mapped
from .partitioned import PartitionedQueue
from .queue import Queue, QueueStats
from .stream import Stream

__all__ = (
    "DeadList",
    "DeadLettersOf",
    "Found",
    "dead_rows",
    "discover",
    "matching",
    "message_row",
    "peek_rows",
    "source_of",
    "stats_rows",
)

Source = Queue[Any] | Stream[Any] | PartitionedQueue[Any]

_SUFFIX = re.compile(r"\{([^{}]+)\}:(ready|leases|registry|dead|delayed|scheduled|stream|fence|members|holders|holds)$")
_PARTITION = re.compile(r"^(.+)#(\d+)$")
_KIND = {"queue": "queue", "stream": "stream", "partitioned": "partitioned queue"}


@dataclass(frozen=True, slots=True)
class Found:
    """A queue, stream or partitioned queue whose keys exist under the client's prefix."""

    kind: str  # "queue", "stream" or "partitioned"
    name: str
    partitions: tuple[int, ...] = ()
    """For a partitioned queue: the partitions that have keys."""


async def discover(mq: Client) -> list[Found]:
    """Every queue, stream and partitioned queue with keys under the prefix, by name
    (SCAN: it never blocks Redis; on a cluster, every master's keys)."""
    kinds: dict[str, str] = {}
    parts: dict[str, set[int]] = {}
    with mapped():
        async for key in mq.redis.scan_iter(match=f"{mq.prefix}:{{*}}:*", count=1000):
            m = _SUFFIX.search(key.decode("utf-8", "replace") if isinstance(key, bytes) else key)
            if m is None:
                continue
            name, suffix = m.groups()
            partition = _PARTITION.match(name)
            if partition is not None:  # '#' is no queue name's: '<name>#<i>' is a partition
                parts.setdefault(partition[1], set()).add(int(partition[2]))
            elif suffix in ("members", "holders", "holds"):
                parts.setdefault(name, set())
            elif suffix != "fence":  # a stream's delayed set looks like a queue's
                kinds[name] = "stream" if suffix == "stream" or kinds.get(name) == "stream" else "queue"
    found = [Found(kind, name) for name, kind in kinds.items()]
    found += [Found("partitioned", name, tuple(sorted(p))) for name, p in parts.items()]
    return sorted(found, key=lambda f: (f.name, f.kind))


def _names(found: list[Found]) -> str:
    shown = [f.name if f.kind == "queue" else f"{f.name} ({_KIND[f.kind]})" for f in found[:20]]
    more = f" and {len(found) - 20} more" if len(found) > 20 else ""
    return f"there are: {', '.join(shown)}{more}" if found else "there are none"


def _partitioned(mq: Client, f: Found) -> PartitionedQueue[Any]:
    # Redis does not record the partition count; the highest partition with keys bounds it.
    return mq.partitioned(f.name, partitions=max(f.partitions, default=0) + 1)


def source_of(mq: Client, name: str, found: list[Found]) -> Source:
    """What ``name`` is among ``found`` (see :func:`discover`); raise :class:`ConfigError`
    naming what there is when it is nothing."""
    partition = _PARTITION.match(name)
    base = name if partition is None else partition[1]
    kinds = {f.kind: f for f in found if f.name == base}
    if partition is not None:
        f = kinds.get("partitioned")
        if f is None:
            raise ConfigError(f"no partitioned queue named {base!r} under prefix {mq.prefix!r}; {_names(found)}")
        pq = _partitioned(mq, f)
        if int(partition[2]) >= len(pq.partitions):
            have = ", ".join(f"{base}#{i}" for i in f.partitions) or "none"
            raise ConfigError(f"partitioned queue {base!r} has no partition {partition[2]} (with keys: {have})")
        return pq.partitions[int(partition[2])]
    if not kinds:
        raise ConfigError(
            f"no queue, stream or partitioned queue named {name!r} under prefix {mq.prefix!r}; {_names(found)}"
        )
    if len(kinds) > 1:
        raise ConfigError(f"{name!r} is both a {' and a '.join(_KIND[k] for k in sorted(kinds))}")
    f = next(iter(kinds.values()))
    if f.kind == "stream":
        return mq.stream(name)
    return mq.queue(name) if f.kind == "queue" else _partitioned(mq, f)


def found_of(source: Source) -> Found:
    if isinstance(source, Stream):
        return Found("stream", source.name)
    if isinstance(source, Queue):
        return Found("queue", source.name)
    return Found("partitioned", source.name, tuple(range(len(source.partitions))))


# -- stats -------------------------------------------------------------------------------


async def _lease_lengths(mq: Client, queue: Queue[Any]) -> dict[str, float]:
    """Each consumer's lease, in seconds, as it records it with every heartbeat."""
    key = queue.keys.lease_lengths
    recorded = await execute(mq.redis, "HGETALL", key, keys=(key,))
    return {_text(c): int(ms) / 1000.0 for c, ms in recorded.items()}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _queue_row(q: QueueStats, leases: dict[str, float], lease_s: float) -> dict[str, Any]:
    consumers = {}
    for c, left in q.consumers.items():
        lease = leases.get(c, lease_s)
        consumers[c] = {
            "lease_s": lease,
            "lease_recorded": c in leases,  # else --lease-s: a consumer of an older version
            "lease_left_s": round(left, 3),
            "last_heartbeat_s_ago": round(lease - left, 3),
        }
    return {"ready": q.ready, "in_flight": q.in_flight, "delayed": q.delayed, "dead": q.dead, "consumers": consumers}


async def _partitioned_row(mq: Client, pq: PartitionedQueue[Any], lease_s: float, by_partition: bool) -> dict[str, Any]:
    s = await pq.stats()
    parts = [
        _queue_row(q, await _lease_lengths(mq, p), lease_s) for q, p in zip(s.partitions, pq.partitions, strict=True)
    ]
    members: dict[str, Any] = {}
    for m in sorted({*s.members, *s.holders.values()}):
        beats = [p["consumers"][m]["last_heartbeat_s_ago"] for p in parts if m in p["consumers"]]
        members[m] = {
            "partitions": sorted(i for i, h in s.holders.items() if h == m),
            "membership_left_s": round(s.members[m], 3) if m in s.members else None,
            "last_heartbeat_s_ago": min(beats) if beats else None,
        }
    row: dict[str, Any] = {"partitions": len(pq.partitions)}
    row |= {k: sum(p[k] for p in parts) for k in ("ready", "in_flight", "delayed", "dead")}
    row["members"] = members
    if by_partition:
        row["by_partition"] = {pq.partitions[i].name: {**p, "holder": s.holders.get(i)} for i, p in enumerate(parts)}
    return row


async def stats_rows(
    mq: Client, names: Iterable[str] = (), lease_s: float = 30.0, *, partitions: bool = False
) -> dict[str, Any]:
    """Of the sources named (default: every one under the prefix). Per queue: ready, in
    flight, delayed, dead, and each consumer's last heartbeat (aged by the lease it
    records, else by ``lease_s``). Per stream: length, delayed, and per group pending, lag,
    dead and each consumer's pending count and idle time. Per partitioned queue: its
    partitions' totals, and each member's partitions and last heartbeat; with
    ``partitions``, each partition's own row too (``by_partition``)."""
    found = await discover(mq)
    wanted = list(names)
    sources = [source_of(mq, n, found) for n in wanted] if wanted else [source_of(mq, f.name, [f]) for f in found]
    out: dict[str, Any] = {"queues": {}, "streams": {}, "partitioned": {}}
    for source in sources:
        if isinstance(source, Queue):
            out["queues"][source.name] = _queue_row(await source.stats(), await _lease_lengths(mq, source), lease_s)
        elif isinstance(source, PartitionedQueue):
            out["partitioned"][source.name] = await _partitioned_row(mq, source, lease_s, partitions)
        else:
            s = await source.stats()
            out["streams"][source.name] = {
                "length": s.length,
                "delayed": s.delayed,
                "dropped_unacked": s.dropped_unacked,
                "groups": {
                    g: {
                        "pending": info.pending,
                        "lag": info.lag,
                        "dead": info.dead,
                        "last_delivered_id": info.last_delivered_id,
                        "consumers": {
                            c: {"pending": ci.pending, "idle_s": round(ci.idle_s, 3)}
                            for c, ci in info.consumers.items()
                        },
                    }
                    for g, info in s.groups.items()
                },
            }
    return out


# -- messages ----------------------------------------------------------------------------


def message_row(raw: bytes, entry_id: str | None = None, preview: int = 200) -> dict[str, Any]:
    """One message as plain data: id, deliveries (so far: each ended without an ack), when
    published, codec, headers and the body (as text, cut to ``preview`` characters); or
    why its bytes do not decode."""
    row: dict[str, Any] = {"entry_id": entry_id} if entry_id is not None else {}
    try:
        env = decode(raw)
    except DecodeError as exc:
        return {**row, "undecodable": str(exc), "bytes": raw[:preview].decode("utf-8", "replace")}
    body = env.body.decode("utf-8", "replace")
    return {
        **row,
        "id": env.id,
        "deliveries": env.attempts,
        "published_at": _utc(env.published_ms),
        "codec": env.codec,
        "headers": dict(env.headers),
        "body": body if len(body) <= preview else body[:preview] + "...",
    }


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def check_group(stream: Stream[Any], group: str, *, dead: bool = False) -> str:
    """``group`` if the stream has it (or, with ``dead``, still has its dead letters)."""
    groups = (await stream.stats()).groups
    if group in groups:
        return group
    if dead:
        key = stream.keys.dead(group)
        if await execute(stream.client.redis, "EXISTS", key, keys=(key,)):
            return group  # the group was deleted; its dead letters were not
    names = f"its groups: {', '.join(sorted(groups))}" if groups else "it has none"
    raise ConfigError(f"stream {stream.name!r} has no group {group!r} ({names})")


def no_group(source: Source, group: str | None) -> None:
    if group is not None and not isinstance(source, Stream):
        kind = "a queue" if isinstance(source, Queue) else "a partitioned queue"
        raise ConfigError(f"{source.name!r} is {kind}: it has no groups (drop --group)")


async def peek_rows(source: Source, group: str | None, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages, next in line first, without taking them: of a queue;
    of a stream (those ``group`` has not been given yet, or from the start); or of a
    partitioned queue (in publish order across its partitions, each row naming its own)."""
    if isinstance(source, Stream):
        if group is not None:
            await check_group(source, group)
        return [message_row(raw, entry_id) for entry_id, raw in await source.peek(group, count)]
    no_group(source, group)
    if isinstance(source, Queue):
        return [message_row(raw) for raw in await source.peek(count)]
    rows = [
        {"partition": i, **message_row(raw)} for i, p in enumerate(source.partitions) for raw in await p.peek(count)
    ]
    return sorted(rows, key=lambda r: str(r.get("id", "")))[:count]  # ids are time-ordered


# -- dead letters ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadList:
    """One dead-letter list: a queue's, a partition's (``partition``), or a stream group's."""

    source: Queue[Any] | Stream[Any]
    group: str | None = None
    partition: int | None = None

    async def records(self, limit: int) -> list[DeadRecord]:
        if isinstance(self.source, Queue):
            return await self.source.dead_letters(limit)
        assert self.group is not None
        return await self.source.dead_letters(self.group, limit)

    async def requeue(self, ids: list[str] | None) -> int:
        if isinstance(self.source, Queue):
            return await self.source.requeue_dead(ids)
        assert self.group is not None
        return await self.source.requeue_dead(self.group, ids)

    async def purge(self, ids: list[str] | None) -> int:
        if isinstance(self.source, Queue):
            return await self.source.purge_dead(ids)
        assert self.group is not None
        return await self.source.purge_dead(self.group, ids)


Chosen = list[tuple[DeadList, DeadRecord]]


class DeadLettersOf:
    """A source's dead letters behind one interface: a queue's, one stream group's, or
    those of every partition of a partitioned queue."""

    def __init__(self, lists: list[DeadList]) -> None:
        self.lists = lists

    @classmethod
    async def of(cls, source: Source, group: str | None) -> DeadLettersOf:
        if isinstance(source, Stream):
            if group is None:
                raise ConfigError(f"{source.name!r} is a stream: say which group's dead letters (--group)")
            return cls([DeadList(source, await check_group(source, group, dead=True))])
        no_group(source, group)
        if isinstance(source, Queue):
            return cls([DeadList(source)])
        return cls([DeadList(p, partition=i) for i, p in enumerate(source.partitions)])

    async def records(self, limit: int) -> Chosen:
        """The oldest ``limit`` records over every list, oldest first, with their list."""
        each = [[(d, r) for r in await d.records(limit)] for d in self.lists]
        return list(heapq.merge(*each, key=lambda pair: pair[1].dead_ms))[:limit]

    async def requeue(self, chosen: Chosen | None) -> int:
        """Requeue the ``chosen`` records (``None``: every one)."""
        return sum([await d.requeue(ids) for d, ids in self._by_list(chosen)])

    async def purge(self, chosen: Chosen | None) -> int:
        """Delete the ``chosen`` records (``None``: every one)."""
        return sum([await d.purge(ids) for d, ids in self._by_list(chosen)])

    def _by_list(self, chosen: Chosen | None) -> list[tuple[DeadList, list[str] | None]]:
        if chosen is None:
            return [(d, None) for d in self.lists]
        ids: dict[int, list[str]] = {}
        for d, r in chosen:
            env = r.envelope
            if env is not None:  # a record that never decoded has no id to name it by
                ids.setdefault(self.lists.index(d), []).append(env.id)
        return [(self.lists[i], wanted) for i, wanted in sorted(ids.items())]


def matching(records: Iterable[DeadRecord], ids: Iterable[str], reason: str | None) -> list[DeadRecord]:
    """Dead letters with any of ``ids`` (if given; records that never decoded have no id)
    and a reason containing ``reason`` (if given, case-insensitive)."""
    wanted = set(ids)
    out: list[DeadRecord] = []
    for r in records:
        env = r.envelope
        if wanted and (env is None or env.id not in wanted):
            continue
        if reason is not None and reason.lower() not in r.reason.lower():
            continue
        out.append(r)
    return out


def dead_rows(chosen: Chosen, preview: int = 200) -> list[dict[str, Any]]:
    """Dead letters as plain data: the reason, when, the partition (of a partitioned
    queue), and the message as :func:`message_row` has it, with its deliveries."""
    return [
        {
            "reason": r.reason,
            "dead_at": _utc(r.dead_ms),
            **({"partition": d.partition} if d.partition is not None else {}),
            **message_row(r.raw, preview=preview),
        }
        for d, r in chosen
    ]


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)
