"""What the operations commands (``aioredmq stats``, ``peek``, ``dead``) read and change,
as plain data: the CLI prints it as tables or JSON; a program may call it directly.
"""

from __future__ import annotations

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
from .queue import Queue
from .stream import Stream

__all__ = ("DeadLettersOf", "Found", "dead_rows", "discover", "matching", "message_row", "source_of", "stats_rows")

_NAME = re.compile(r"\{([^{}]+)\}:(ready|leases|dead|delayed|stream)$")


@dataclass(frozen=True, slots=True)
class Found:
    """A queue or stream whose keys exist under the client's prefix."""

    kind: str  # "queue" or "stream"
    name: str


async def discover(mq: Client) -> list[Found]:
    """Every queue and stream with keys under the prefix, by name (SCAN: it never blocks
    Redis; on a cluster, every master's keys)."""
    found: dict[str, str] = {}
    with mapped():
        async for key in mq.redis.scan_iter(match=f"{mq.prefix}:{{*}}:*", count=1000):
            m = _NAME.search(key.decode("utf-8", "replace") if isinstance(key, bytes) else key)
            if m is not None:
                name, suffix = m.groups()
                found[name] = "stream" if suffix == "stream" or found.get(name) == "stream" else "queue"
    return [Found(kind, name) for name, kind in sorted(found.items())]


async def source_of(mq: Client, name: str) -> Queue[Any] | Stream[Any]:
    """The queue or stream called ``name``: a stream if its stream key exists."""
    stream = mq.stream(name)
    exists = await execute(mq.redis, "EXISTS", stream.keys.stream, keys=(stream.keys.stream,))
    return stream if exists else mq.queue(name)


async def stats_rows(mq: Client, names: Iterable[str], lease_s: float) -> dict[str, Any]:
    """Per queue: ready, in flight, delayed, dead, and each consumer's last heartbeat (its
    lease deadline minus ``lease_s``); per stream: length, delayed, and per group pending,
    lag, dead and each consumer's pending count and idle time."""
    out: dict[str, Any] = {"queues": {}, "streams": {}}
    for name in names:
        source = await source_of(mq, name)
        if isinstance(source, Queue):
            q = await source.stats()
            out["queues"][name] = {
                "ready": q.ready,
                "in_flight": q.in_flight,
                "delayed": q.delayed,
                "dead": q.dead,
                "consumers": {
                    c: {"lease_left_s": round(left, 3), "last_heartbeat_s_ago": round(lease_s - left, 3)}
                    for c, left in q.consumers.items()
                },
            }
        else:
            s = await source.stats()
            out["streams"][name] = {
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


def message_row(raw: bytes, entry_id: str | None = None, preview: int = 200) -> dict[str, Any]:
    """One message as plain data: id, attempts, when published, codec, headers and the
    body (as text, cut to ``preview`` characters); or why its bytes do not decode."""
    row: dict[str, Any] = {"entry_id": entry_id} if entry_id is not None else {}
    try:
        env = decode(raw)
    except DecodeError as exc:
        return {**row, "undecodable": str(exc), "bytes": raw[:preview].decode("utf-8", "replace")}
    body = env.body.decode("utf-8", "replace")
    return {
        **row,
        "id": env.id,
        "attempts": env.attempts,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(env.published_ms / 1000)),
        "codec": env.codec,
        "headers": dict(env.headers),
        "body": body if len(body) <= preview else body[:preview] + "...",
    }


def dead_rows(records: Iterable[DeadRecord], preview: int = 200) -> list[dict[str, Any]]:
    return [
        {
            "reason": r.reason,
            "dead_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.dead_ms / 1000)),
            **message_row(r.raw, preview=preview),
        }
        for r in records
    ]


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


class DeadLettersOf:
    """A queue's dead letters, or one stream group's, behind one interface."""

    def __init__(self, source: Queue[Any] | Stream[Any], group: str | None) -> None:
        self.source, self.group = source, group

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


def needs_group(source: Queue[Any] | Stream[Any], group: str | None) -> str | None:
    if isinstance(source, Stream) and group is None:
        raise ConfigError(f"{source.name!r} is a stream: say which group's dead letters (--group)")
    if isinstance(source, Queue) and group is not None:
        raise ConfigError(f"{source.name!r} is a queue: it has no groups (drop --group)")
    return group


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)
