"""The reliable list queue: publish, consume, inspect and manage dead letters."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .codecs import Codec
from .commands import execute, pipeline, resent_once
from .config import RetryPolicy, check_positive
from .consumer import Consumer
from .dead import DeadLetters
from .envelope import DeadRecord, with_attempts
from .keys import QueueKeys
from .producer import Producer, Publishing

if TYPE_CHECKING:
    from .client import Client

__all__ = ("Queue", "QueueStats")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of where a queue's messages are."""

    ready: int
    in_flight: int
    delayed: int
    dead: int
    consumers: dict[str, float]
    """Live or recently expired consumers -> seconds until their lease expires (negative: expired)."""


class Queue(Publishing[T]):
    """A reliable FIFO queue on Redis lists. Get one with ``client.queue(name)``."""

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
        partition_of: str | None = None,
        body: type[T] | None = None,
    ) -> None:
        # A partition of a partitioned queue is named '<name>#<i>': checked as <name>.
        self.keys = keys = QueueKeys(client.prefix, name)
        self._setup(
            client,
            name if partition_of is None else partition_of,
            keys,
            codec=codec,
            body=body,
            retry=retry,
            lease_s=lease_s,
            max_body_bytes=max_body_bytes,
            max_buffered=max_buffered,
        )
        self.producer = Producer(
            client,
            name,
            script_name="publish",
            target=self.keys.ready,
            producer_key=self.keys.producer(os.urandom(8).hex()),
            max_buffered=max_buffered,
        )
        self.name = name
        self._dead = DeadLetters(client, self.keys.dead, self.keys.ready, "list", lambda raw, _: with_attempts(raw, 0))
        self.settings = (self.codec.name, body, retry, self.lease_s, max_body_bytes, max_buffered)

    def __repr__(self) -> str:
        return f"<Queue {self.name!r}>"

    # -- consuming -------------------------------------------------------------------

    def consume(
        self,
        *,
        prefetch: int = 100,
        name: str | None = None,
        block_s: float = 5.0,
        close_timeout_s: float = 10.0,
    ) -> Consumer[T]:
        """A consumer; use ``async with queue.consume() as c: async for msg in c``.

        ``prefetch``: the most messages it holds un-settled. ``name``: unique among live
        consumers; fix it so a restarted worker takes back its own leftovers at once.
        ``block_s``: how long one blocking wait lasts when the queue is empty.
        """
        return Consumer(self, prefetch=prefetch, name=name, block_s=block_s, close_timeout_s=close_timeout_s)

    # -- inspection ------------------------------------------------------------------

    @resent_once
    async def stats(self) -> QueueStats:
        """Counts of ready, in-flight, waiting-to-retry and dead messages, and the consumers."""
        self.client.check_open()
        redis = self.client.redis
        k = self.keys
        keys = (k.ready, k.leases, k.delayed, k.dead, k.registry)
        ready, delayed, dead, (sec, usec), leases, registered = await pipeline(
            redis,
            [
                ("LLEN", k.ready),
                ("ZCARD", k.delayed),
                ("LLEN", k.dead),
                ("TIME",),
                ("ZRANGE", k.leases, 0, -1, "WITHSCORES"),
                ("ZRANGE", k.registry, 0, -1),
            ],
            keys=keys,
        )
        now_ms = int(sec) * 1000 + int(usec) // 1000
        if leases and not isinstance(leases[0], (list, tuple)):  # a flat reply: member, score, ...
            leases = list(zip(leases[::2], leases[1::2], strict=True))
        pairs = [(member.decode("utf-8", "replace"), float(score)) for member, score in leases]
        # In-flight lists whose lease entry is lost are counted too: the registry names them.
        holders = list(dict.fromkeys([member for member, _ in leases] + list(registered)))
        lengths = await pipeline(redis, [("LLEN", k.inflight_of(member)) for member in holders], keys=keys)
        return QueueStats(
            ready=ready,
            in_flight=sum(lengths),
            delayed=delayed,
            dead=dead,
            consumers={name: (score - now_ms) / 1000.0 for name, score in pairs},
        )

    @resent_once
    async def peek(self, count: int = 10) -> list[bytes]:
        """The next ``count`` ready envelopes, next in line first, without taking them
        (:func:`aioredmq.envelope.decode` reads one; a foreign writer's bytes may not decode)."""
        self.client.check_open()
        check_positive("count", count, integer=True)
        items: list[bytes] = await execute(
            self.client.redis, "LRANGE", self.keys.ready, -count, -1, keys=(self.keys.ready,)
        )
        return items[::-1]

    # -- dead letters ----------------------------------------------------------------

    @resent_once
    async def dead_letters(self, limit: int = 100) -> list[DeadRecord]:
        """The oldest ``limit`` dead-letter records, oldest first."""
        self.client.check_open()
        return await self._dead.list(limit)

    async def requeue_dead(self, ids: Iterable[str] | None = None, *, limit: int | None = None) -> int:
        """Move dead letters (all, or those with these ids) back to ready with a fresh
        delivery count, oldest first. Records whose bytes never decoded stay. Returns how many moved."""
        self.client.check_open()
        return await self._dead.move(ids, limit, requeue=True)

    async def purge_dead(self, ids: Iterable[str] | None = None) -> int:
        """Delete dead letters (all, or those with these ids). Returns how many were deleted."""
        self.client.check_open()
        return await self._dead.purge(ids)
