"""What every consumer shares, whatever the transport: lifecycle, iteration, decoding
and batched settling.

A transport subclass supplies three loops' worth of Redis work:

* ``_open()``: recover what a previous life under the same name left behind;
* ``_fetch_loop()``: fill the held set up to ``prefetch``, calling ``_accept``;
* ``_timer_loop()``: leases, recovery of crashed consumers, due retries;

and the settle side: ``_settle_ack``, ``_retry`` and ``_release`` queue settles (a ref
naming the delivery, an action, a value, a score) that ``_flush_settles`` sends as one
script call, ``_settle_script`` with ``_settle_keys``. The script returns the positions
of settles that came too late (the delivery was recovered elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import anyio

from .codecs import Codec
from .config import RetryPolicy, check_positive
from .delayed import DueTimer
from .envelope import Envelope, decode, encode_dead, with_attempts
from .errors import TRANSIENT, AioredmqError, ClosedError, DecodeError, permanent
from .keys import check_name
from .message import Message
from .scripts import script
from .tasks import Gate, Tasks, cancel_and_wait

if TYPE_CHECKING:
    from .client import Client
    from .commands import AnyRedis
    from .producer import Publishing

__all__ = ("BaseConsumer", "ConsumerStats", "default_consumer_name", "delivered", "now_ms", "until_done")

log = logging.getLogger("aioredmq.consumer")
T = TypeVar("T")

_MAX_SETTLE_BATCH = 1000
_MAX_SETTLE_BYTES = 8 * 1024 * 1024
_FAILURE_LOG_EVERY_S = 10.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def delivered(deliveries: int, limit: int) -> str:
    """The end of a dead-letter reason: how often the message was tried, of how many."""
    return f"delivered {deliveries} time{'' if deliveries == 1 else 's'} (max_deliveries={limit})"


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
    """Settles that came after the delivery was recovered elsewhere (its lease was lost)."""
    resent_settles: int = 0
    """Settles resent after a lost reply and found applied already (by the lost call)."""
    adopted: int = 0
    reaped_consumers: int = 0
    """List queues: expired consumers whose messages this one recovered."""
    claimed: int = 0
    """Streams: entries recovered from consumers that stopped renewing them."""
    trimmed: int = 0
    """Streams: pending entries found deleted (trimmed) before they were acked."""
    groups_recreated: int = 0
    """Streams: times this consumer found its group gone (data lost) and created it again."""
    connection_errors: int = 0


async def until_done(step: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``step`` until it succeeds, as a loop retries: Redis down, restarting, loading,
    busy with a script, or a pooled connection it dropped while idle all only delay it.
    What no wait cures raises (:func:`aioredmq.errors.permanent`). Logged at the first
    failure, then every 10 s, so a worker started before Redis says what it waits for."""
    failures = 0
    logged = 0.0
    while True:
        try:
            await step()
        except AioredmqError as exc:
            if permanent(exc):
                raise
            failures += 1
            now = time.monotonic()
            if failures == 1 or now - logged >= _FAILURE_LOG_EVERY_S:
                logged = now
                log.warning("%s failed (%s); waiting for Redis, retrying (try %d)", what, exc, failures)
            await anyio.sleep(min(0.05 * 2**failures, 0.2 if isinstance(exc, TRANSIENT) else 5.0))
            continue
        if failures:
            log.warning("%s succeeded after %d failed tries", what, failures)
        return


class BaseConsumer(Generic[T]):
    """Iterate with ``async with source.consume() as c: async for msg in c``."""

    def __init__(
        self,
        source: Publishing[T],
        *,
        label: str,
        prefetch: int,
        name: str | None,
        block_s: float,
        close_timeout_s: float,
    ) -> None:
        check_positive("prefetch", prefetch, integer=True)
        check_positive("block_s", block_s)
        check_positive("close_timeout_s", close_timeout_s)
        self.client: Client = source.client
        self._metrics = source.client.metrics
        self.label = label
        self.codec: Codec = source.codec
        self.retry: RetryPolicy = source.retry
        self.max_body_bytes = source.max_body_bytes
        lease_s = source.lease_s
        self.name = check_name("name", name) if name is not None else default_consumer_name()
        self.prefetch = prefetch
        # A blocking wait must end well inside the lease: a dead consumer's last blocking
        # read must not land after its lease is recovered and forgotten.
        self.block_s = min(block_s, lease_s / 3)
        self.close_timeout_s = close_timeout_s
        self.stats = ConsumerStats()
        self._lease_ms = int(lease_s * 1000)
        # ref (what names the delivery in Redis) -> its message (None while undecoded)
        self._held: dict[bytes, Message[T] | None] = {}
        self._ready: deque[Message[T]] = deque()
        self._has_ready = Gate()  # iterators waiting for a message
        self._room = asyncio.Event()
        # Settles waiting to be sent: plain acks in two parallel lists (the hot path: no
        # tuple per ack), everything else as (ref, action, value, score).
        self._ack_refs: list[bytes] = []
        self._ack_tags: list[bytes] = []
        self._settles: list[tuple[bytes, bytes, bytes, int]] = []
        self._settle_wake = asyncio.Event()
        self._settled_all = asyncio.Event()
        self._settled_all.set()
        self._error: BaseException | None = None
        self._failure_logged = -_FAILURE_LOG_EVERY_S
        self._stopped = False
        self._state = 0  # 0 new, 1 open, 2 closing/closed
        self._tasks = Tasks(on_crash=self._crashed)
        self._fetch_task: asyncio.Task[None] | None = None
        self._conn: AnyRedis | None = None
        # While a listing of what Redis says we hold is on its way: refs that settles removed
        # meanwhile. The listing may predate their removal, so they must not be taken for orphans.
        self._settled_while_listing: set[bytes] | None = None
        # Held messages whose handler runs on though another consumer recovered them
        # (warned of once; pruned to what is still held by whoever looks at it).
        self._lost_refs: set[bytes] = set()
        self._timer_wake = asyncio.Event()
        # Set by subclasses: when to move due delayed messages, and where to; where
        # processed-id markers live (see idempotency.py).
        self._due: DueTimer
        self._done_key: str
        # Set by subclasses: the settle script, its keys, and arguments before the acks.
        self._settle_script = script("settle")
        self._settle_keys: tuple[str, ...] = ()
        self._settle_head: tuple[str | bytes, ...] = ()

    # -- transport hooks -------------------------------------------------------------

    async def _open(self) -> None:
        raise NotImplementedError

    async def _fetch_loop(self) -> None:
        raise NotImplementedError

    async def _timer_loop(self) -> None:
        raise NotImplementedError

    async def _return_strays(self) -> None:
        """Once the fetch has stopped, before anything else is given back: return what a
        cancelled read may have moved to us unknown. It is newer than every message held."""

    async def _close_in_redis(self) -> None:
        """After every settle is flushed: hand back strays, deregister."""
        raise NotImplementedError

    def _ack_tag(self, msg: Message[T]) -> bytes:
        raise NotImplementedError

    def _retry(self, msg: Message[T], delay_s: float | None) -> None:
        raise NotImplementedError

    def _release(self, ref: bytes, raw: bytes, deliveries: int, reason: str) -> None:
        """A delivery ended without an ack or nack (cancelled, closed, restarted)."""
        raise NotImplementedError

    def _return_unstarted(self, msgs: list[Message[T]]) -> None:
        """Fetched, never handed out: back in line with the delivery count unchanged."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------

    async def _open_checked(self) -> None:
        # The version check is retried with the opening: a consumer started while Redis
        # was down checks the server it finally reaches.
        await self.client.check_server()
        await self._open_in_redis()

    async def __aenter__(self) -> Self:
        if self._state:
            raise ClosedError("a consumer can be opened only once; call consume() again")
        client = self.client
        client.check_open()
        self._state = 1
        self._conn = client.dedicated(self.block_s + max(5.0, self.block_s))
        client.consumers.add(self)
        try:
            await until_done(self._open_checked, f"consumer {self.name}: opening")
        except BaseException:
            self._state = 2
            self._due.close()
            client.consumers.discard(self)
            await client.release_dedicated(self._conn)
            raise
        self._fetch_task = self._tasks.spawn(self._fetch_loop(), f"aioredmq-fetch-{self.name}")
        self._tasks.spawn(self._settle_loop(), f"aioredmq-settle-{self.name}")
        self._tasks.spawn(self._timer_loop(), f"aioredmq-timer-{self.name}")
        return self

    async def _open_in_redis(self) -> None:
        await self._open()  # first: a stream's group must exist before due entries are appended
        await self._due.open()

    def _crashed(self, exc: BaseException) -> None:
        self._error = exc
        self._has_ready.open_all()

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

    async def aclose(self, *, deadline: float | None = None) -> None:
        """Stop fetching, give back what is unfinished, flush settles, deregister.

        All of it within ``close_timeout_s`` (or by ``deadline``, an ``anyio.current_time()``
        value, if sooner): what is not settled by then stays in Redis with this consumer and
        is recovered once its lease expires."""
        if self._state != 1:
            self._state = 2
            return
        self._state = 2
        own = anyio.current_time() + self.close_timeout_s
        deadline = own if deadline is None else min(own, deadline)
        with anyio.CancelScope(shield=True):
            if self._fetch_task is not None:
                await cancel_and_wait(self._fetch_task)
            try:
                with anyio.CancelScope(deadline=deadline):
                    await self._return_strays()
            except AioredmqError as exc:
                log.warning("consumer %s: could not look for strays on close: %s", self.name, exc)
            self._has_ready.open_all()  # wake iterators: they stop
            unstarted = list(self._ready)
            self._ready.clear()
            for msg in unstarted:
                msg._settled = True
            if unstarted:
                self._return_unstarted(unstarted)
                self.stats.returned += len(unstarted)
            for ref, held in list(self._held.items()):
                if held is not None and not held._settled:
                    held._settled = True
                    self._release(ref, held.raw, held.deliveries, "delivery did not finish (consumer closed)")
            clean = False
            try:
                with anyio.CancelScope(deadline=deadline):
                    await self._settled_all.wait()
                    await self._close_in_redis()
                    clean = True
            except AioredmqError as exc:
                log.warning("consumer %s: close could not finish in Redis: %s", self.name, exc)
            if not clean:
                log.warning(
                    "consumer %s closed before every settle reached Redis; %d message(s) "
                    "stay with it and are recovered when its lease expires",
                    self.name,
                    len(self._held),
                )
            try:
                await self._tasks.aclose()
            finally:
                self._due.close()
                self.client.consumers.discard(self)
                if self._conn is not None:
                    await self.client.release_dedicated(self._conn)

    # -- iteration -------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    def stop_delivery(self) -> None:
        """Hand out no more messages: iterators end; what is buffered returns on close."""
        self._stopped = True
        self._has_ready.open_all()

    async def __anext__(self) -> Message[T]:
        ready = self._ready
        while True:
            if self._stopped or self._state != 1:
                if self._state == 0:
                    raise ClosedError("the consumer is not open: use 'async with source.consume()'")
                self.client.check_open()  # closed with its client: an error, not the end
                raise StopAsyncIteration
            if ready:
                break
            if self._error is not None:
                raise self._error
            await self._has_ready.wait()
        msg = ready.popleft()
        msg._started = True
        self.stats.delivered += 1
        if self._metrics is not None:
            self._metrics.delivered(self.label, msg.deliveries)
        return msg

    @property
    def held(self) -> int:
        """Messages this consumer holds: fetched and not yet settled."""
        return len(self._held)

    async def _wait_for_room(self) -> None:
        while len(self._held) >= self.prefetch:
            self._room.clear()
            await self._room.wait()

    async def _pause_after_failure(self, what: str, exc: AioredmqError, failures: int) -> None:
        """Wait before the next try of a loop's step that failed. A lost link or a "not now"
        (a failover, a restart) is retried every 0.2 s at most: it is over in seconds. Any
        other error the server returned (full memory, lost data, a reply we do not know) is
        retried too, backing off to 5 s. Failures are logged at most once per 10 s, so an
        outage of minutes does not flood the log."""
        self.stats.connection_errors += 1
        transient = isinstance(exc, TRANSIENT)
        delay = min(0.05 * 2**failures, 0.2 if transient else 5.0)
        now = time.monotonic()
        if now - self._failure_logged >= _FAILURE_LOG_EVERY_S:
            self._failure_logged = now
            log.log(
                logging.WARNING if transient else logging.ERROR,
                "consumer %s: %s failed (%s); retrying until it succeeds (try %d)",
                self.name,
                what,
                exc,
                failures,
            )
        await anyio.sleep(delay)

    def _fail(self, what: str, exc: AioredmqError) -> None:
        """What no wait cures (a key of another type, a missing permission): the iterator
        raises it. See :func:`aioredmq.errors.permanent`."""
        log.error("consumer %s: %s stopped: %s", self.name, what, exc)
        self._error = exc
        self._has_ready.open_all()

    # -- decoding --------------------------------------------------------------------

    def _decode(self, raw: bytes) -> tuple[Envelope, T]:
        if len(raw) > self.max_body_bytes:
            # Our producers refuse these; a writer that does not check sizes put it there.
            raise DecodeError(f"message is {len(raw)} bytes, over max_body_bytes={self.max_body_bytes}")
        env = decode(raw)
        codec = self.codec
        if env.codec != codec.name:
            raise DecodeError(f"body was written with codec {env.codec!r}; this consumer uses {codec.name!r}")
        try:
            return env, codec.decode(env.body)
        except DecodeError:
            raise
        except Exception as exc:  # a codec of the user's may raise anything
            raise DecodeError(f"codec {codec.name!r} failed: {exc!r}") from exc

    def _accept_one(self, ref: bytes, raw: bytes, deliveries: int | None) -> Message[T] | None:
        """Take ownership of one delivery; dead-letter it if it does not decode.
        ``deliveries`` defaults to what the envelope counts."""
        try:
            env, body = self._decode(raw)
        except (DecodeError, RecursionError) as exc:
            self._undecodable(ref, raw, exc)
            return None
        msg = Message(self, ref, raw, env, body, env.attempts + 1 if deliveries is None else deliveries)
        self._held[ref] = msg
        return msg

    def _undecodable(self, ref: bytes, raw: bytes, exc: Exception) -> None:
        self._held[ref] = None
        self.stats.dead_lettered += 1
        if self._metrics is not None:
            self._metrics.dead_lettered(self.label)
        log.warning("consumer %s: undecodable message dead-lettered: %s", self.name, exc)
        self._enqueue(ref, b"X", encode_dead(raw, f"undecodable: {exc}", now_ms()), 0)

    def _lost(self, ref: bytes) -> bool:
        """Another consumer recovered a message we hold (we froze past the lease), or it
        was trimmed. Not handed out yet: drop it (return True), whoever recovered it
        handles it. Handed out: its handler finishes beside the redelivery, and its settle
        counts as late."""
        msg = self._held.get(ref)
        if msg is None or msg._settled:
            return False
        if not msg._started:
            msg._settled = True
            self._ready.remove(msg)
            del self._held[ref]
            self._room.set()
            return True
        if ref not in self._lost_refs:
            self._lost_refs.add(ref)
            log.warning("consumer %s: lease of message %s was lost to another consumer", self.name, msg.id)
        return False

    def _log_dropped(self, dropped: int) -> None:
        if dropped:
            log.warning(
                "consumer %s: its lease lapsed; %d message(s) it had not handed out were recovered elsewhere",
                self.name,
                dropped,
            )

    def _deliver(self, msgs: list[Message[T]], fetched: int) -> None:
        self._ready.extend(msgs)
        self.stats.fetched += fetched
        self._has_ready.open(len(msgs))

    # -- settling --------------------------------------------------------------------

    def _enqueue(self, ref: bytes, action: bytes, value: bytes, score: int) -> None:
        if self._state == 0:
            raise ClosedError("the consumer is not open")
        if action == b"A":
            self._ack_refs.append(ref)
            self._ack_tags.append(value)
        else:
            self._settles.append((ref, action, value, score))
        self._settled_all.clear()
        self._settle_wake.set()

    def _after_settle(self, msg: Message[T]) -> None:
        """A handed-out message was acked, nacked, dead-lettered or given back."""

    def _settle_ack(self, msg: Message[T]) -> None:
        # The hot path of every handled message: the settler is woken only by the first
        # settle of a batch (the events stay as they are while settles are waiting).
        self.stats.acked += 1
        if self._metrics is not None:
            self._metrics.acked(self.label)
        refs = self._ack_refs
        if not refs and not self._settles:
            self._settled_all.clear()
            self._settle_wake.set()
        refs.append(msg._ref)
        self._ack_tags.append(self._ack_tag(msg))
        self._after_settle(msg)

    def _settle_ack_marked(self, msg: Message[T], ttl_ms: int) -> None:
        """Ack, and mark the message id processed for ``ttl_ms``, in the same script call."""
        self.stats.acked += 1
        if self._metrics is not None:
            self._metrics.acked(self.label)
        self._enqueue(msg._ref, b"M", msg.id.encode(), ttl_ms)
        self._after_settle(msg)

    def _settle_nack(self, msg: Message[T], delay_s: float | None, reason: str) -> None:
        policy = self.retry
        if msg.deliveries >= policy.max_deliveries:
            self._settle_dead(msg, f"{reason}; {delivered(msg.deliveries, policy.max_deliveries)}")
            return
        self.stats.nacked += 1
        if self._metrics is not None:
            self._metrics.nacked(self.label)
        self._retry(msg, policy.backoff_s(msg.deliveries) if delay_s is None else delay_s)
        self._after_settle(msg)

    def _settle_dead(self, msg: Message[T], reason: str) -> None:
        self._dead(msg._ref, msg.raw, reason, msg.deliveries)
        self._after_settle(msg)

    def _dead(self, ref: bytes, raw: bytes, reason: str, deliveries: int | None = None) -> None:
        """Dead-letter a delivery. With ``deliveries``, the record's envelope counts them as
        its attempts (each ended without an ack), so the record tells how often it was tried."""
        if deliveries is not None:
            try:
                decode(raw)
            except DecodeError:
                pass
            else:
                raw = with_attempts(raw, deliveries)
        self.stats.dead_lettered += 1
        if self._metrics is not None:
            self._metrics.dead_lettered(self.label)
        self._enqueue(ref, b"X", encode_dead(raw, reason, now_ms()), 0)

    def _settle_release(self, msg: Message[T]) -> None:
        self._release(msg._ref, msg.raw, msg.deliveries, "handler cancelled")
        self._after_settle(msg)

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            failures = 0
            while self._ack_refs or self._settles:
                try:
                    await self._flush_settles(resent=failures > 0)
                    failures = 0
                except AioredmqError as exc:
                    # Whatever Redis said: dropping the batch would strand it with a consumer
                    # that keeps its lease alive. Settles are idempotent (one already applied
                    # finds nothing to act on): resend until Redis takes them.
                    failures += 1
                    await self._pause_after_failure("settle", exc, failures)
            self._settled_all.set()

    async def _flush_settles(self, *, resent: bool = False) -> None:
        """Send the waiting settles in one script call. ``resent``: the call before failed
        with no reply, and may have applied some of these: those the script then finds gone
        were most likely settled by it, so they count as ``resent_settles``, not as late."""
        tags = self._ack_tags[:_MAX_SETTLE_BATCH]
        n_acks = len(tags)
        size = count = 0
        for ref, _, value, _ in self._settles[:_MAX_SETTLE_BATCH]:
            size += len(ref) + len(value)
            if count and size > _MAX_SETTLE_BYTES:  # big envelopes: keep one call well inside Redis' limits
                break
            count += 1
        others = self._settles[:count]
        args: list[Any] = [*self._settle_head, n_acks, *tags]
        for item in others:
            args += item
        with anyio.CancelScope(shield=True):
            late = await self._settle_script(self.client.redis, self._settle_keys, args)
        # Retries this call scheduled: the timer learns their due time from the settle
        # itself, whatever a promote call in flight meanwhile replies (it may have looked
        # before they were there, and found nothing waiting).
        retry_ms = [score for _, action, _, score in others if action == b"D"]
        if retry_ms:
            self._due.hint(min(retry_ms) / 1000.0)
        refs = self._ack_refs[:n_acks]
        del self._ack_refs[:n_acks]
        del self._ack_tags[:n_acks]
        del self._settles[:count]
        if resent and late:
            self.stats.resent_settles += len(late)
            log.info(
                "consumer %s: %d settle(s) resent after a lost reply were applied already",
                self.name,
                len(late),
            )
        elif late:
            if self._metrics is not None:
                self._metrics.late_acks(self.label, len(late))
            for position in late:
                ref = refs[position - 1] if position <= n_acks else others[position - 1 - n_acks][0]
                self.stats.late_settles += 1
                msg = self._held.get(ref)
                log.warning(
                    "consumer %s: late settle of message %s: its lease was lost and it was recovered elsewhere",
                    self.name,
                    msg.id if msg is not None else "?",
                )
        pop = self._held.pop
        for ref in refs:
            pop(ref, None)
        for ref, *_ in others:
            pop(ref, None)
        listing = self._settled_while_listing
        if listing is not None:
            listing.update(refs)
            listing.update(ref for ref, *_ in others)
        self._room.set()

    async def _listing(self, coro: Any) -> tuple[Any, set[bytes]]:
        """Await a listing of what Redis says we hold; also return the refs settled meanwhile."""
        settled: set[bytes] = set()
        self._settled_while_listing = settled
        try:
            return await coro, settled
        finally:
            self._settled_while_listing = None
