"""Streams: a log every consumer group reads in full, with acks, recovery and retention.

Each message is one stream entry whose field ``m`` holds the same envelope a queue
uses. Every group gets every entry; within a group, each entry goes to one consumer.

Trimming comes in two modes. By default ``maxlen`` and ``max_age_s`` trim
approximately, as Redis does, whether or not the groups have acked. With
``trim_acked=True`` the stream keeps every entry some group still needs (pending, or
not yet delivered to it) and drops the rest as soon as a publish or :meth:`Stream.trim`
runs; ``maxlen`` and ``max_age_s`` then become hard caps, and what they drop before
every group acked it is counted (``StreamStats.dropped_unacked``) and logged.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .codecs import Codec
from .commands import execute, pipeline, resent_once
from .config import RetryPolicy, check_positive
from .dead import DeadLetters
from .envelope import DeadRecord, Envelope, encode
from .errors import ConfigError, OutOfMemoryError, ResponseError
from .keys import StreamKeys, check_name
from .producer import Producer, Publishing
from .scripts import script
from .stream_consumer import GROUP_HEADER, StreamConsumer

if TYPE_CHECKING:
    from .client import Client

__all__ = ("ConsumerInfo", "GroupStats", "Stream", "StreamStats")

T = TypeVar("T")
_ENTRY_ID = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")


def group_start(start: str) -> str:
    """``'new'`` (only entries added from now on), ``'begin'`` (every entry kept) or an entry id."""
    if start == "new":
        return "$"
    if start == "begin":
        return "0"
    if isinstance(start, str) and _ENTRY_ID.match(start):
        return start
    raise ConfigError(f"start={start!r} must be 'new', 'begin' or a stream entry id such as '1700000000000-0'")


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    pending: int
    """Entries it was handed and has not acked."""
    idle_s: float
    """Seconds since it last read, claimed or renewed."""


@dataclass(frozen=True, slots=True)
class GroupStats:
    pending: int
    """Entries delivered to the group's consumers and not yet acked."""
    lag: int | None
    """Entries not yet delivered to the group (``None`` when Redis cannot tell, after deletions)."""
    last_delivered_id: str
    dead: int
    """Records in the group's dead-letter list."""
    consumers: dict[str, ConsumerInfo]


@dataclass(frozen=True, slots=True)
class StreamStats:
    length: int
    groups: dict[str, GroupStats]
    dropped_unacked: int
    """Entries a cap removed (``trim_acked`` mode) before every group acked them, ever."""
    delayed: int
    """Messages waiting in the delayed set to be appended."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Stream(Publishing[T]):
    """A stream with consumer groups. Get one with ``client.stream(name)``."""

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        codec: str | Codec,
        retry: RetryPolicy,
        lease_s: float,
        max_body_bytes: int,
        max_buffered: int,
        maxlen: int | None,
        max_age_s: float | None,
        trim_acked: bool,
        body: type[T] | None = None,
    ) -> None:
        self.keys = keys = StreamKeys(client.prefix, name)
        self._setup(
            client,
            name,
            keys,
            codec=codec,
            body=body,
            retry=retry,
            lease_s=lease_s,
            max_body_bytes=max_body_bytes,
            max_buffered=max_buffered,
        )
        if maxlen is not None:
            check_positive("maxlen", maxlen, integer=True)
        if max_age_s is not None:
            check_positive("max_age_s", max_age_s)
        self._trim_args = (maxlen or 0, math.ceil(max_age_s * 1000) if max_age_s else 0, int(bool(trim_acked)))
        self.producer = Producer(
            client,
            name,
            script_name="xpublish",
            target=self.keys.stream,
            producer_key=self.keys.producer(os.urandom(8).hex()),
            extra_keys=(self.keys.dropped,),
            extra_args=self._trim_args,
            max_buffered=max_buffered,
        )
        self.settings = (self.codec.name, body, retry, self.lease_s, max_body_bytes, max_buffered, self._trim_args)

    def __repr__(self) -> str:
        return f"<Stream {self.name!r}>"

    # -- groups and consuming --------------------------------------------------------

    async def create_group(self, group: str, start: str = "new") -> bool:
        """Create ``group`` (and the stream, if needed). Returns False if it existed: an
        existing group keeps its position. Any error but "already exists" is raised.

        ``start``: ``'new'`` (the default) delivers only entries appended from now on:
        entries already in the stream, such as those published before this call, never
        reach the group. To have a group see a publish, create it before that publish,
        or pass ``'begin'`` (every entry the stream still holds) or an entry id.
        """
        self.client.check_open()
        check_name("group", group)
        key = self.keys.stream
        try:
            await execute(
                self.client.redis, "XGROUP", "CREATE", key, group, group_start(start), "MKSTREAM", keys=(key,)
            )
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        except OutOfMemoryError:
            # Over maxmemory XGROUP CREATE is refused before Redis looks for the group: a
            # consumer of an existing group must still open, to drain what fills memory.
            if group in await self._group_names():
                return False
            raise
        return True

    async def _group_names(self) -> set[str]:
        key = self.keys.stream
        try:
            groups = await execute(self.client.redis, "XINFO", "GROUPS", key, keys=(key,))
        except ResponseError:  # no such key
            return set()
        names = set()
        for g in groups:
            fields = g if isinstance(g, dict) else dict(zip(g[::2], g[1::2], strict=True))
            name = fields.get("name", fields.get(b"name"))
            names.add(name.decode() if isinstance(name, bytes) else str(name))
        return names

    def consume(
        self,
        group: str = "default",
        *,
        start: str = "new",
        prefetch: int = 100,
        name: str | None = None,
        block_s: float = 5.0,
        close_timeout_s: float = 10.0,
        forget_idle_consumers_s: float = 3600.0,
    ) -> StreamConsumer[T]:
        """A consumer in ``group``; use ``async with stream.consume("billing") as c: async for msg in c``.

        The group is created on open if missing, reading from ``start``: ``'new'``,
        ``'begin'`` or an entry id (see :meth:`create_group`). With ``'new'``, a group
        created here misses every entry published before this consumer first opened:
        create the group before publishing, or use ``'begin'``. ``start`` is ignored for
        a group that exists. ``name``: unique within the group; fix it so a restarted
        worker resumes its own pending entries first. Consumers of the group idle for
        ``forget_idle_consumers_s`` and holding nothing are removed.
        """
        group_start(start)
        return StreamConsumer(
            self,
            group=check_name("group", group),
            start=start,
            prefetch=prefetch,
            name=name,
            block_s=block_s,
            close_timeout_s=close_timeout_s,
            forget_idle_consumers_s=forget_idle_consumers_s,
        )

    # -- retention -------------------------------------------------------------------

    async def trim(self) -> int:
        """Trim now, as a publish does; return how many un-acked entries a cap dropped."""
        self.client.check_open()
        k = self.keys
        _, dropped = await script("xpublish")(
            self.client.redis, (k.stream, k.producer("trim"), k.dropped), (0, 0, *self._trim_args)
        )
        return int(dropped)

    # -- inspection ------------------------------------------------------------------

    @resent_once
    async def stats(self) -> StreamStats:
        """Length, per-group pending, lag and dead letters, and each consumer's idle time."""
        self.client.check_open()
        redis, k = self.client.redis, self.keys
        exists, length, dropped, delayed = await pipeline(
            redis,
            [("EXISTS", k.stream), ("XLEN", k.stream), ("GET", k.dropped), ("ZCARD", k.delayed)],
            keys=(k.stream,),
        )
        if not exists:
            return StreamStats(0, {}, int(dropped or 0), delayed)
        groups = await execute(redis, "XINFO", "GROUPS", k.stream, keys=(k.stream,))
        names = [_text(g[b"name"]) for g in groups]
        details = await pipeline(
            redis,
            [c for name in names for c in (("XINFO", "CONSUMERS", k.stream, name), ("LLEN", k.dead(name)))],
            keys=(k.stream,),
        )
        out: dict[str, GroupStats] = {}
        for i, (name, g) in enumerate(zip(names, groups, strict=True)):
            consumers, dead = details[2 * i], details[2 * i + 1]
            lag = g.get(b"lag")
            out[name] = GroupStats(
                pending=int(g[b"pending"]),
                lag=None if lag is None else int(lag),
                last_delivered_id=_text(g[b"last-delivered-id"]),
                dead=int(dead),
                consumers={
                    _text(c[b"name"]): ConsumerInfo(int(c[b"pending"]), int(c[b"idle"]) / 1000.0) for c in consumers
                },
            )
        return StreamStats(int(length), out, int(dropped or 0), delayed)

    @resent_once
    async def peek(self, group: str | None = None, count: int = 10) -> list[tuple[str, bytes]]:
        """Up to ``count`` entries as (entry id, envelope), oldest first, without reading
        them for any group: those ``group`` has not been given yet, or from the start."""
        self.client.check_open()
        check_positive("count", count, integer=True)
        redis, key = self.client.redis, self.keys.stream
        start = "-"
        if group is not None:
            stats = await self.stats()
            if group not in stats.groups:
                raise ConfigError(f"stream {self.name!r} has no group {group!r}")
            start = "(" + stats.groups[group].last_delivered_id
        rows = await execute(redis, "XRANGE", key, start, "+", "COUNT", count, keys=(key,))
        out: list[tuple[str, bytes]] = []
        for entry_id, fields in rows:
            fields = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=False))
            out.append((_text(entry_id), fields.get(b"m", b"")))
        return out

    # -- dead letters (per group) ----------------------------------------------------

    def _dead(self, group: str) -> DeadLetters:
        self.client.check_open()
        check_name("group", group)

        def requeued(_: bytes, env: Envelope) -> bytes:
            # A new entry every group reads, marked so that only this group delivers it.
            headers = {**env.headers, GROUP_HEADER: group}
            return encode(env.id, 0, env.published_ms, env.codec, headers, env.body)

        return DeadLetters(self.client, self.keys.dead(group), self.keys.stream, "stream", requeued)

    @resent_once
    async def dead_letters(self, group: str, limit: int = 100) -> list[DeadRecord]:
        """The oldest ``limit`` dead-letter records of ``group``, oldest first."""
        return await self._dead(group).list(limit)

    async def requeue_dead(self, group: str, ids: Iterable[str] | None = None, *, limit: int | None = None) -> int:
        """Deliver dead letters of ``group`` (all, or those with these ids) again, to that
        group only, with a fresh delivery count. Returns how many were requeued."""
        return await self._dead(group).move(ids, limit, requeue=True)

    async def purge_dead(self, group: str, ids: Iterable[str] | None = None) -> int:
        """Delete dead letters of ``group`` (all, or those with these ids)."""
        return await self._dead(group).purge(ids)
