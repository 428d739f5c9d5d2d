"""The reliable list consumer: fetch into an in-flight list, deliver, settle in batches.

Three tasks run per consumer:

* **fetch**: while it holds fewer than ``prefetch`` messages, one ``take`` script call
  moves a batch from ready into this consumer's in-flight list; when ready is empty,
  ``BLMOVE`` waits on a dedicated connection. A lost reply (the move may have
  happened) is repaired by adopting whatever sits in the in-flight list unknown to us.
* **settle**: acks, nacks, dead-letters and returns are queued and sent together as
  one ``settle`` script call; a message leaves the held set only once Redis confirms.
* **timer**: one ``heartbeat`` script call renews the lease, moves due retries from the
  delayed set to ready and names expired consumers, which it then reaps; it runs every
  ``lease_s / 3`` and at the earliest due time it knows of.

Closing stops the fetch, returns what was never handed out to the front of ready
(delivery count unchanged), returns what was handed out but not settled (count raised),
flushes every settle and deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from .commands import execute
from .config import check_positive
from .envelope import decode, encode_dead, with_attempts
from .errors import TRANSIENT, AioredmqError, ClosedError, DecodeError
from .keys import check_name
from .message import Message
from .scripts import script
from .tasks import Tasks, cancel_and_wait

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .queue import Queue

__all__ = ("Consumer", "ConsumerStats")

log = logging.getLogger("aioredmq.consumer")
T = TypeVar("T")

_MAX_SETTLE_BATCH = 1000
_MAX_SETTLE_BYTES = 8 * 1024 * 1024
_REAP_BATCH = 16


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def default_consumer_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())[:60]
    return f"{host or 'host'}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer, since it opened."""

    fetched: int = 0
    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    returned: int = 0
    late_settles: int = 0
    adopted: int = 0
    reaped_consumers: int = 0
    connection_errors: int = 0


class Consumer(Generic[T]):
    """Iterate with ``async with queue.consume() as c: async for msg in c``."""

    def __init__(
        self,
        queue: Queue[T],
        *,
        prefetch: int = 100,
        name: str | None = None,
        block_s: float = 5.0,
        close_timeout_s: float = 10.0,
    ) -> None:
        check_positive("prefetch", prefetch, integer=True)
        check_positive("block_s", block_s)
        check_positive("close_timeout_s", close_timeout_s)
        self.queue = queue
        self.name = check_name("name", name) if name is not None else default_consumer_name()
        self.prefetch = prefetch
        # A blocking wait must end well inside the lease: the reaper forgets an expired, empty
        # lease after one more lease, and a dead consumer's BLMOVE landing later would be lost.
        self.block_s = min(block_s, queue.lease_s / 3)
        self.close_timeout_s = close_timeout_s
        self.stats = ConsumerStats()
        keys = queue.keys
        self._inflight = keys.inflight(self.name)
        self._take_keys = (keys.ready, self._inflight, keys.leases)
        self._settle_keys = (self._inflight, keys.ready, keys.delayed, keys.dead)
        self._lease_ms = int(queue.lease_s * 1000)
        # Take at most half the prefetch per call: the next batch is on its way while this
        # one is handled, instead of fetch, handle and settle taking turns.
        self._take_max = max(1, prefetch // 2)
        # raw envelope -> its message (None until decoded), for everything in our in-flight list
        self._held: dict[bytes, Message[T] | None] = {}
        self._ready: deque[Message[T]] = deque()
        self._has_ready = asyncio.Event()
        self._room = asyncio.Event()
        self._settles: list[tuple[bytes, bytes, bytes, int]] = []
        self._settle_wake = asyncio.Event()
        self._settled_all = asyncio.Event()
        self._settled_all.set()
        self._timer_wake = asyncio.Event()
        self._next_due: float | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._look_for_orphans = False
        self._state = 0  # 0 new, 1 open, 2 closing/closed
        self._tasks = Tasks(on_crash=self._crashed)
        self._fetch_task: asyncio.Task[None] | None = None
        self._conn: Redis | None = None
        # While _adopt_orphans waits for its LRANGE: envelopes that settles removed meanwhile.
        # The listing may predate their removal, so they must not be taken for orphans.
        self._settled_while_listing: set[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Consumer[T]:
        if self._state:
            raise ClosedError("a Consumer can be opened only once; call queue.consume() again")
        client = self.queue.client
        client.check_open()
        self._state = 1
        self._conn = client.dedicated(self.block_s + max(5.0, self.block_s))
        client.consumers.add(self)
        try:
            await self._tick()
            await self._recover_own_leftovers()
        except BaseException:
            self._state = 2
            client.consumers.discard(self)
            await client.release_dedicated(self._conn)
            raise
        self._fetch_task = self._tasks.spawn(self._fetch_loop(), f"aioredmq-fetch-{self.name}")
        self._tasks.spawn(self._settle_loop(), f"aioredmq-settle-{self.name}")
        self._tasks.spawn(self._timer_loop(), f"aioredmq-timer-{self.name}")
        return self

    def _crashed(self, exc: BaseException) -> None:
        self._error = exc
        self._has_ready.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._state == 2

    async def aclose(self) -> None:
        """Stop fetching, give back what is unfinished, flush settles, deregister."""
        if self._state != 1:
            self._state = 2
            return
        self._state = 2
        with anyio.CancelScope(shield=True):
            if self._fetch_task is not None:
                await cancel_and_wait(self._fetch_task)
            self._has_ready.set()  # wake iterators: they stop
            # Never handed out: back to the front in the same order, count unchanged.
            unstarted = list(self._ready)
            self._ready.clear()
            for msg in reversed(unstarted):
                msg._settled = True
                self._enqueue(msg.raw, b"F", msg.raw, 0)
            self.stats.returned += len(unstarted)
            # Handed out but never settled: a delivery that did not finish.
            for raw, held in list(self._held.items()):
                if held is not None and not held._settled:
                    held._settled = True
                    self._enqueue_release(raw)
            clean = False
            try:
                with anyio.move_on_after(self.close_timeout_s):
                    await self._settled_all.wait()
                    # A blocking move cancelled above may still have landed: hand it back.
                    await self._return_orphans()
                    await script("deregister")(
                        self.queue.client.redis, (self.queue.keys.leases, self._inflight), (self.name,)
                    )
                    clean = True
            except AioredmqError as exc:
                log.warning("consumer %s: close could not finish in Redis: %s", self.name, exc)
            if not clean:
                log.warning(
                    "consumer %s closed before every settle reached Redis; %d message(s) "
                    "stay in flight and return when its lease expires",
                    self.name,
                    len(self._held),
                )
            try:
                await self._tasks.aclose()
            finally:
                self.queue.client.consumers.discard(self)
                if self._conn is not None:
                    await self.queue.client.release_dedicated(self._conn)

    # -- iteration -------------------------------------------------------------------

    def __aiter__(self) -> Consumer[T]:
        return self

    def stop_delivery(self) -> None:
        """Hand out no more messages: iterators end; what is buffered returns on close."""
        self._stopped = True
        self._has_ready.set()

    async def __anext__(self) -> Message[T]:
        if self._stopped or self._state == 2:
            raise StopAsyncIteration
        while not self._ready:
            if self._stopped:
                raise StopAsyncIteration
            if self._state != 1:
                if self._state == 0:
                    raise ClosedError("the consumer is not open: use 'async with queue.consume()'")
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._has_ready.clear()
            await self._has_ready.wait()
        msg: Message[T] = self._ready.popleft()
        msg._started = True
        self.stats.delivered += 1
        return msg

    @property
    def held(self) -> int:
        """Messages in this consumer's in-flight list (fetched and not yet settled)."""
        return len(self._held)

    # -- fetch -----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._conn is not None
        conn = self._conn
        take = script("take")
        ready, inflight = self.queue.keys.ready, self._inflight
        failures = 0
        idle = False
        # Loop on state, not only on cancellation: redis-py turns a cancel that lands in a
        # blocking read into a ConnectionError, which would otherwise look transient.
        while self._state == 1:
            while len(self._held) >= self.prefetch:
                self._room.clear()
                await self._room.wait()
            try:
                if failures or self._look_for_orphans:
                    self._look_for_orphans = False
                    await self._adopt_orphans()
                    failures = 0
                    continue  # adoption may have filled the room: check it again
                room = min(self.prefetch - len(self._held), self._take_max)
                items = [] if idle else await take(conn, self._take_keys, (room, self.name, self._lease_ms))
                if not items:
                    item = await execute(
                        conn, "BLMOVE", ready, inflight, "RIGHT", "LEFT", self.block_s, keys=(ready, inflight)
                    )
                    # Timed out: ready stayed empty, so block again without a take in between.
                    idle = item is None
                    if idle:
                        continue
                    items = [item]
                failures = 0
            except TRANSIENT as exc:
                if self._state != 1:
                    return
                idle = False
                failures += 1
                self.stats.connection_errors += 1
                delay = min(0.05 * 2**failures, 2.0)
                log.warning("consumer %s: fetch failed (%s); retrying in %.2fs", self.name, exc, delay)
                await anyio.sleep(delay)
                continue
            except AioredmqError as exc:
                # Not transient (wrong key type, missing permission, ...): the iterator raises it.
                log.error("consumer %s: fetch stopped: %s", self.name, exc)
                self._error = exc
                self._has_ready.set()
                return
            self._accept(items)

    def _accept(self, items: list[bytes]) -> None:
        """Take ownership of envelopes now in our in-flight list (oldest first)."""
        queue = self.queue
        codec = queue.codec
        for raw in items:
            self._held[raw] = None
            try:
                env = decode(raw)
                if env.codec != codec.name:
                    raise DecodeError(f"body was written with codec {env.codec!r}; this queue uses {codec.name!r}")
                try:
                    body = codec.decode(env.body)
                except DecodeError:
                    raise
                except Exception as exc:  # a codec of the user's may raise anything
                    raise DecodeError(f"codec {codec.name!r} failed: {exc!r}") from exc
            except (DecodeError, RecursionError) as exc:
                self.stats.dead_lettered += 1
                log.warning("consumer %s: undecodable message dead-lettered: %s", self.name, exc)
                self._enqueue(raw, b"X", encode_dead(raw, f"undecodable: {exc}", _now_ms()), 0)
                continue
            msg = Message(self, raw, env, body)
            self._held[raw] = msg
            self._ready.append(msg)
        self.stats.fetched += len(items)
        self._has_ready.set()

    async def _adopt_orphans(self) -> None:
        """After a lost reply: what our in-flight list holds that we do not know is ours."""
        settled: set[bytes] = set()
        self._settled_while_listing = settled
        try:
            listed = await self._list_inflight()
        finally:
            self._settled_while_listing = None
        orphans = [raw for raw in reversed(listed) if raw not in self._held and raw not in settled]
        if orphans:
            self.stats.adopted += len(orphans)
            log.info("consumer %s adopted %d message(s) moved by a lost reply", self.name, len(orphans))
            self._accept(orphans)

    async def _list_inflight(self) -> list[bytes]:
        """Our in-flight list as Redis has it, newest first."""
        listed: list[bytes] = await execute(
            self.queue.client.redis, "LRANGE", self._inflight, 0, -1, keys=(self._inflight,)
        )
        return listed

    async def _return_orphans(self) -> None:
        listed = await self._list_inflight()
        args: list[Any] = [0]
        for raw in listed:  # newest first: each goes to the front, so the oldest ends first
            if raw not in self._held:
                args += (raw, b"F", raw, 0)
        if len(args) > 1:
            await script("settle")(self.queue.client.redis, self._settle_keys, args)

    async def _recover_own_leftovers(self) -> None:
        """A consumer restarted under a fixed name finds its last life's in-flight list."""
        listed = await self._list_inflight()
        if listed:
            log.warning("consumer %s found %d message(s) left from a previous run", self.name, len(listed))
            for raw in listed:
                self._enqueue_release(raw)
            await self._flush_settles()

    # -- settling --------------------------------------------------------------------

    def _enqueue(self, raw: bytes, action: bytes, value: bytes, score: int) -> None:
        if self._state == 0:
            raise ClosedError("the consumer is not open")
        self._settles.append((raw, action, value, score))
        self._settled_all.clear()
        self._settle_wake.set()

    def _enqueue_release(self, raw: bytes, *, reason: str = "") -> None:
        """A delivery ended without an ack or nack: front of ready with a raised count."""
        try:
            attempts = decode(raw).attempts + 1
        except DecodeError as exc:
            self.stats.dead_lettered += 1
            self._enqueue(raw, b"X", encode_dead(raw, f"undecodable: {exc}", _now_ms()), 0)
            return
        max_deliveries = self.queue.retry.max_deliveries
        if attempts >= max_deliveries:
            why = reason or "delivery did not finish (consumer closed or restarted)"
            why = f"{why}; delivered {attempts} times (max_deliveries={max_deliveries})"
            self.stats.dead_lettered += 1
            self._enqueue(raw, b"X", encode_dead(raw, why, _now_ms()), 0)
        else:
            self.stats.returned += 1
            self._enqueue(raw, b"F", with_attempts(raw, attempts), 0)

    def _settle_ack(self, msg: Message[T]) -> None:
        self.stats.acked += 1
        # An ack names the delivery by id and attempt count, not by its (maybe large) bytes.
        self._enqueue(msg.raw, b"A", b"%b %d" % (msg.id.encode(), msg.deliveries - 1), 0)

    def _settle_nack(self, msg: Message[T], delay_s: float | None, reason: str) -> None:
        policy = self.queue.retry
        if msg.deliveries >= policy.max_deliveries:
            why = f"{reason}; delivered {msg.deliveries} times (max_deliveries={policy.max_deliveries})"
            self._settle_dead(msg, why)
            return
        self.stats.nacked += 1
        delay = policy.backoff_s(msg.deliveries) if delay_s is None else delay_s
        retry = with_attempts(msg.raw, msg.deliveries)
        if delay <= 0:
            self._enqueue(msg.raw, b"B", retry, 0)
            return
        self._enqueue(msg.raw, b"D", retry, max(1, int(delay * 1000)))
        due = time.monotonic() + delay
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._timer_wake.set()

    def _settle_dead(self, msg: Message[T], reason: str) -> None:
        self.stats.dead_lettered += 1
        self._enqueue(msg.raw, b"X", encode_dead(msg.raw, reason, _now_ms()), 0)

    def _settle_release(self, msg: Message[T]) -> None:
        self._enqueue_release(msg.raw, reason="handler cancelled")

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            failures = 0
            while self._settles:
                try:
                    await self._flush_settles()
                    failures = 0
                except TRANSIENT as exc:
                    # Safe to resend: a settle already applied finds nothing to remove.
                    failures += 1
                    self.stats.connection_errors += 1
                    delay = min(0.05 * 2**failures, 2.0)
                    log.warning("consumer %s: settle failed (%s); retrying in %.2fs", self.name, exc, delay)
                    await anyio.sleep(delay)
                except AioredmqError as exc:
                    # Refused (BUSY, READONLY, NOREPLICAS, MISCONF, ...). Dropping the batch would
                    # leave it in our in-flight list, which no reaper looks at while we renew the
                    # lease. Settles are idempotent: retry, slowly.
                    failures += 1
                    delay = min(0.05 * 2**failures, 5.0)
                    log.error("consumer %s: settle refused (%s); retrying in %.2fs", self.name, exc, delay)
                    await anyio.sleep(delay)
            self._settled_all.set()

    async def _flush_settles(self) -> None:
        size = count = 0
        for raw, action, value, _ in self._settles[:_MAX_SETTLE_BATCH]:
            count += 1
            size += len(value) if action == b"A" else len(raw) + len(value)
            if size > _MAX_SETTLE_BYTES:  # big envelopes: keep one call well inside Redis' limits
                break
        batch = self._settles[:count]
        acks = [item for item in batch if item[1] == b"A"]
        others = [item for item in batch if item[1] != b"A"]
        args: list[Any] = [len(acks)]
        args += [tag for _, _, tag, _ in acks]
        for item in others:
            args += item
        with anyio.CancelScope(shield=True):
            late = await script("settle")(self.queue.client.redis, self._settle_keys, args)
        del self._settles[: len(batch)]
        ordered = acks + others
        for position in late:
            raw = ordered[position - 1][0]
            self.stats.late_settles += 1
            msg = self._held.get(raw)
            log.warning(
                "consumer %s: late settle of message %s: its lease was lost and it was recovered elsewhere",
                self.name,
                msg.id if msg is not None else "?",
            )
        listing = self._settled_while_listing
        for raw, *_ in batch:
            self._held.pop(raw, None)
            if listing is not None:
                listing.add(raw)
        self._room.set()

    # -- timer: heartbeat, reap, promote ---------------------------------------------

    async def _tick(self) -> list[bytes]:
        """Renew the lease and move due retries; return the consumers whose lease expired."""
        keys = self.queue.keys
        moved, next_ms, in_flight, *expired = await script("heartbeat")(
            self.queue.client.redis,
            (keys.leases, keys.delayed, keys.ready, self._inflight),
            (self.name, self._lease_ms, _REAP_BATCH, 1000),
        )
        if moved:
            log.debug("consumer %s: %d due retries moved to ready", self.name, moved)
        self._next_due = None if next_ms < 0 else time.monotonic() + next_ms / 1000.0
        if in_flight > len(self._held):
            # More in our list than we know of: a move whose reply never came (or a take in
            # flight right now). The fetch loop looks, between its own commands.
            self._look_for_orphans = True
        return list(expired)

    async def _reap_expired(self, members: list[bytes]) -> None:
        """Recover what each expired consumer held. Members are used as the bytes they are:
        a member some other writer put there is reaped (and later forgotten) like any other."""
        me = self.name.encode()
        keys = self.queue.keys
        for member in members:
            if member == me:
                continue
            requeued, dead = await script("reap")(
                self.queue.client.redis,
                (keys.leases, keys.inflight_of(member), keys.ready, keys.dead),
                (member, self.queue.retry.max_deliveries, self._lease_ms),
            )
            if requeued >= 0 and (requeued or dead):
                self.stats.reaped_consumers += 1
                log.warning(
                    "consumer %s: lease of %s expired; %d message(s) back to ready, %d dead-lettered",
                    self.name,
                    member.decode("utf-8", "replace"),
                    requeued,
                    dead,
                )

    async def _timer_loop(self) -> None:
        interval = self.queue.lease_s / 3
        next_beat = time.monotonic() + interval
        while self._state == 1:
            now = time.monotonic()
            try:
                if now >= next_beat or (self._next_due is not None and now >= self._next_due):
                    if now >= next_beat:
                        next_beat = now + interval
                    await self._reap_expired(await self._tick())
            except TRANSIENT as exc:
                self.stats.connection_errors += 1
                log.warning("consumer %s: heartbeat failed (%s)", self.name, exc)
                self._next_due = None  # learn it again from the next successful tick
            except AioredmqError:
                log.exception("consumer %s: heartbeat failed", self.name)
            wake = next_beat if self._next_due is None else min(next_beat, self._next_due)
            self._timer_wake.clear()
            with anyio.move_on_after(max(0.0, wake - time.monotonic())):
                await self._timer_wake.wait()
