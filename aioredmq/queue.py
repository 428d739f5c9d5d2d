"""The reliable list queue: publish, consume, inspect and manage dead letters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .codecs import Codec, get_codec
from .commands import execute, pipeline
from .config import RetryPolicy, check_positive
from .consumer import Consumer
from .envelope import DeadRecord, decode, decode_dead, encode_many, with_attempts
from .errors import ConfigError, DecodeError, MessageTooLargeError
from .ids import new_ids
from .keys import QueueKeys, check_name
from .producer import Producer
from .scripts import script

if TYPE_CHECKING:
    from .client import Client

__all__ = ("Queue", "QueueStats")

T = TypeVar("T")
_DEAD_PAGE = 1000


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of where a queue's messages are."""

    ready: int
    in_flight: int
    delayed: int
    dead: int
    consumers: dict[str, float]
    """Live or recently expired consumers -> seconds until their lease expires (negative: expired)."""


class Queue(Generic[T]):
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
    ) -> None:
        check_name("name", name)
        check_positive("lease_s", lease_s)
        check_positive("max_body_bytes", max_body_bytes, integer=True)
        check_positive("max_buffered", max_buffered, integer=True)
        if not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry={retry!r} must be an aioredmq.RetryPolicy")
        self.client = client
        self.name = name
        self.codec = get_codec(codec)
        self.retry = retry
        self.lease_s = float(lease_s)
        self.max_body_bytes = max_body_bytes
        self.keys = QueueKeys(client.prefix, name)
        self.producer = Producer(client, self.keys, max_buffered=max_buffered)
        self.settings = (self.codec.name, retry, self.lease_s, max_body_bytes, max_buffered)

    def __repr__(self) -> str:
        return f"<Queue {self.name!r}>"

    # -- publishing ------------------------------------------------------------------

    def _encode(self, bodies: Iterable[Any], headers: Mapping[str, str] | None) -> tuple[list[str], list[bytes]]:
        """Ids and envelopes for a batch; checks every one before anything is sent."""
        if headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise TypeError("headers must map str to str")
        encode = self.codec.encode
        encoded = [encode(body) for body in bodies]
        ids = new_ids(len(encoded))
        raws = encode_many(
            ids, time.time_ns() // 1_000_000, self.codec.name, dict(headers) if headers else None, encoded
        )
        if raws and (largest := max(map(len, raws))) > self.max_body_bytes:
            raise MessageTooLargeError(
                f"a message to {self.name!r} is {largest} bytes encoded, over max_body_bytes="
                f"{self.max_body_bytes}; nothing was sent. Store large payloads elsewhere and "
                "send a reference, or raise max_body_bytes"
            )
        return ids, raws

    async def publish(self, body: T, *, headers: Mapping[str, str] | None = None) -> str:
        """Append one message; return its id once Redis has it.

        Concurrent calls share one round trip. Raises :class:`MessageTooLargeError`
        before sending anything, :class:`PublishUnconfirmedError` when Redis never
        confirmed (the message may exist), :class:`ClosedError` after close.
        Cancelling the call does not withdraw the message: once buffered, it is sent.
        """
        self.client.check_open()
        (message_id,), raws = self._encode((body,), headers)
        await self.producer.send(raws)
        return message_id

    async def publish_many(self, bodies: Iterable[T], *, headers: Mapping[str, str] | None = None) -> list[str]:
        """Append many messages in order, in as few round trips as the batch limits allow.

        Every body is encoded and checked before anything is sent. Chunks are buffered as
        room allows, so one is on its way while the next is queued. If an error is raised,
        chunks before the failing one may have been published.
        """
        self.client.check_open()
        ids, raws = self._encode(bodies, headers)
        chunk = max(1, min(2000, self.producer.max_buffered))
        pending = [await self.producer.submit(raws[i : i + chunk]) for i in range(0, len(raws), chunk)]
        outcomes = await asyncio.gather(*pending, return_exceptions=True)  # every chunk's fate is read
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return ids

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

    async def stats(self) -> QueueStats:
        """Counts of ready, in-flight, waiting-to-retry and dead messages, and the consumers."""
        redis = self.client.redis
        k = self.keys
        keys = (k.ready, k.leases, k.delayed, k.dead)
        ready, delayed, dead, (sec, usec), leases = await pipeline(
            redis,
            [
                ("LLEN", k.ready),
                ("ZCARD", k.delayed),
                ("LLEN", k.dead),
                ("TIME",),
                ("ZRANGE", k.leases, 0, -1, "WITHSCORES"),
            ],
            keys=keys,
        )
        now_ms = int(sec) * 1000 + int(usec) // 1000
        if leases and not isinstance(leases[0], (list, tuple)):  # a flat reply: member, score, ...
            leases = list(zip(leases[::2], leases[1::2], strict=True))
        pairs = [(member.decode("utf-8", "replace"), float(score)) for member, score in leases]
        lengths = await pipeline(redis, [("LLEN", k.inflight_of(member)) for member, _ in leases], keys=keys)
        return QueueStats(
            ready=ready,
            in_flight=sum(lengths),
            delayed=delayed,
            dead=dead,
            consumers={name: (score - now_ms) / 1000.0 for name, score in pairs},
        )

    # -- dead letters ----------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadRecord]:
        """The oldest ``limit`` dead-letter records, oldest first."""
        check_positive("limit", limit, integer=True)
        raw = await execute(self.client.redis, "LRANGE", self.keys.dead, -limit, -1, keys=(self.keys.dead,))
        return [decode_dead(r) for r in reversed(raw)]

    async def _move_dead(self, ids: Iterable[str] | None, limit: int | None, requeue: bool) -> int:
        """Requeue or drop dead letters, oldest first, reading the list a page at a time."""
        wanted = set(ids) if ids is not None else None
        if limit is not None:
            check_positive("limit", limit, integer=True)
        dead, move = self.keys.dead, script("move_dead")
        moved = kept = 0  # kept: records at the old end looked at and left in place
        while limit is None or moved < limit:
            page = await execute(self.client.redis, "LRANGE", dead, -(kept + _DEAD_PAGE), -(kept + 1), keys=(dead,))
            args: list[Any] = []
            for record in reversed(page):  # oldest first
                if limit is not None and moved + len(args) // 2 >= limit:
                    break
                original = decode_dead(record).raw
                try:
                    env = decode(original)
                except DecodeError:
                    env = None
                # A record that never decoded is not requeued: it would only die again.
                if (wanted is not None and (env is None or env.id not in wanted)) or (requeue and env is None):
                    kept += 1
                    continue
                args += (record, with_attempts(original, 0) if requeue else b"")
            if args:
                moved += int(await move(self.client.redis, (dead, self.keys.ready), args))
            if len(page) < _DEAD_PAGE or (limit is not None and moved >= limit):
                break
        return moved

    async def requeue_dead(self, ids: Iterable[str] | None = None, *, limit: int | None = None) -> int:
        """Move dead letters (all, or those with these ids) back to ready with a fresh
        delivery count, oldest first. Records whose bytes never decoded stay. Returns how many moved."""
        return await self._move_dead(ids, limit, requeue=True)

    async def purge_dead(self, ids: Iterable[str] | None = None) -> int:
        """Delete dead letters (all, or those with these ids). Returns how many were deleted."""
        if ids is None:
            dead = self.keys.dead
            n, _ = await pipeline(self.client.redis, [("LLEN", dead), ("DEL", dead)], keys=(dead,), transaction=True)
            return int(n)
        return await self._move_dead(ids, None, requeue=False)
