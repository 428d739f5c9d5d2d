"""The partitioned queue: per-key ordering, with different keys in parallel.

A message published with a ``key`` goes to partition ``crc32(key) % N``, a list queue of
its own (``<name>#<i>``, hash tag ``{<name>#<i>}``: partitions spread over Cluster
nodes). Each partition is held by at most one consumer at a time, through a lease that
the holder renews every ``lease_s / 3``; the members share the partitions fairly and
rebalance as members join or leave (``partition_balance`` script).

Within a consumer, a message is handed out only when no earlier message of the same key
is unsettled, so one key's messages are handled strictly in publish order while other
keys run in parallel. A failed message keeps its key blocked: it is delivered again in
place after its backoff (or dead-lettered at the limit), never behind later messages.

Across a crash the order holds too: when a member takes over a partition, before it
fetches anything it returns every message the previous holder had in flight to the front
of the partition's ready list (oldest first). A member giving a partition up in a
rebalance first lets its running handlers finish, for up to ``handover_grace_s``; then
the runner's handlers still running are cancelled, and the partition is released only
once none of its handlers runs (a handler of an ``async for`` loop cannot be cancelled
from here, so the partition waits for it); what is unfinished returns to the front.
A partition lost to another member (its lease lapsed, or a script refused the holder's
fencing token) has its runner handlers cancelled at once, and its keys stay blocked in
this member until those handlers have ended, so taking it back never runs a key twice.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import anyio

from .base_consumer import default_consumer_name, until_done
from .codecs import Codec
from .commands import execute, pipeline, resent_once
from .config import RetryPolicy, check_positive
from .consumer import Consumer
from .envelope import with_attempts
from .errors import AioredmqError, ClosedError, ConfigError, permanent
from .keys import PartitionKeys, check_name
from .message import Message
from .producer import refuse_one_body, replica_wait
from .queue import Queue, QueueStats
from .scripts import script
from .tasks import Tasks

if TYPE_CHECKING:
    from .client import Client

__all__ = ("KEY_HEADER", "PartitionedConsumer", "PartitionedQueue", "PartitionedStats")

log = logging.getLogger("aioredmq.partitioned")
T = TypeVar("T")

KEY_HEADER = "aioredmq-key"
"""The header that carries a message's ordering key."""


@dataclass(frozen=True, slots=True)
class PartitionedStats:
    partitions: list[QueueStats]
    holders: dict[int, str]
    """Partition -> the member holding it (live or not yet expired)."""
    members: dict[str, float]
    """Members -> seconds until their membership expires."""


class PartitionedQueue(Generic[T]):
    """N list queues and the leases that give each to one consumer. Get one with
    ``client.partitioned(name, partitions=N)``."""

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        partitions: int,
        codec: str | Codec,
        body: type[T] | None = None,
        retry: RetryPolicy,
        lease_s: float,
        max_body_bytes: int,
        max_buffered: int,
    ) -> None:
        check_name("name", name)
        check_positive("partitions", partitions, integer=True)
        self.client = client
        self.name = name
        self.keys = PartitionKeys(client.prefix, name)
        self.retry = retry
        self.lease_s = float(lease_s)
        self.partitions: list[Queue[T]] = [
            Queue(
                client,
                self.keys.partition(i),
                codec=codec,
                body=body,
                retry=retry,
                lease_s=lease_s,
                max_body_bytes=max_body_bytes,
                max_buffered=max_buffered,
                partition_of=name,
            )
            for i in range(partitions)
        ]
        self.settings = (partitions, *self.partitions[0].settings)

    def __repr__(self) -> str:
        return f"<PartitionedQueue {self.name!r} partitions={len(self.partitions)}>"

    def partition_of(self, key: str) -> int:
        """The partition a key's messages go to (stable across processes and versions)."""
        return zlib.crc32(key.encode("utf-8")) % len(self.partitions)

    def _headers(self, key: str, headers: Mapping[str, str] | None) -> dict[str, str]:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"key={key!r} must be a non-empty string")
        return {**(headers or {}), KEY_HEADER: key}

    async def publish(
        self,
        body: T,
        *,
        key: str,
        headers: Mapping[str, str] | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        replicas: int = 0,
        replica_timeout_s: float = 1.0,
    ) -> str:
        """Append one message to ``key``'s partition; return its id once Redis has it
        (and ``replicas`` replicas, as for :meth:`Queue.publish`).

        A delayed message joins its key's order when it becomes due, not when published.
        """
        partition = self.partitions[self.partition_of(key)]
        return await partition.publish(
            body,
            headers=self._headers(key, headers),
            delay=delay,
            at=at,
            replicas=replicas,
            replica_timeout_s=replica_timeout_s,
        )

    async def publish_many(
        self,
        items: Iterable[tuple[str, T]],
        *,
        headers: Mapping[str, str] | None = None,
        replicas: int = 0,
        replica_timeout_s: float = 1.0,
    ) -> list[str]:
        """Append ``(key, body)`` pairs; each key's messages keep their order. Returns the ids
        in the order given. Partitions are written concurrently: if an error is raised,
        some keys' messages may have been published. ``replicas``: as for :meth:`Queue.publish`."""
        self.client.check_open()
        refuse_one_body(items)
        by_key: dict[str, list[int]] = {}
        pairs = list(items)
        for i, (key, _) in enumerate(pairs):
            by_key.setdefault(key, []).append(i)
        ids: list[str] = [""] * len(pairs)

        replica_wait(replicas, replica_timeout_s)  # a bad value raises before anything is sent
        errors: list[Exception] = []

        async def one_key(key: str, positions: list[int]) -> None:
            partition = self.partitions[self.partition_of(key)]
            try:
                sent = await partition.publish_many(
                    [pairs[i][1] for i in positions],
                    headers=self._headers(key, headers),
                    replicas=replicas,
                    replica_timeout_s=replica_timeout_s,
                )
            except Exception as exc:  # raised below as it is, not inside an exception group
                errors.append(exc)
                return
            for i, message_id in zip(positions, sent, strict=True):
                ids[i] = message_id

        async with anyio.create_task_group() as tg:
            for key, positions in by_key.items():
                tg.start_soon(one_key, key, positions)
        if errors:
            raise errors[0]
        return ids

    async def cancel(self, message_id: str) -> bool:
        """Withdraw a delayed message by id, from whichever partition holds it."""
        for partition in self.partitions:
            if await partition.cancel(message_id):
                return True
        return False

    def consume(
        self,
        *,
        prefetch: int = 100,
        name: str | None = None,
        block_s: float = 5.0,
        close_timeout_s: float = 10.0,
        handover_grace_s: float = 30.0,
    ) -> PartitionedConsumer[T]:
        """A member; use ``async with pq.consume() as c: async for msg in c``.

        ``prefetch`` applies per partition held. ``handover_grace_s``: how long running
        handlers of a partition given up in a rebalance may take before it is handed over.
        Past it, handlers run by ``mq.run()`` are cancelled (their messages go back to the
        front); a handler of your own ``async for`` loop is waited for, since it cannot be
        cancelled from here. The partition is released only once none of its handlers runs.
        """
        return PartitionedConsumer(
            self,
            prefetch=prefetch,
            name=name,
            block_s=block_s,
            close_timeout_s=close_timeout_s,
            handover_grace_s=handover_grace_s,
        )

    @resent_once
    async def stats(self) -> PartitionedStats:
        """Each partition's counts, who holds which, and the members' remaining leases."""
        self.client.check_open()
        k = self.keys
        parts = [await p.stats() for p in self.partitions]
        holders, members, (now_s, now_us) = await pipeline(
            self.client.redis,
            [("HGETALL", k.holders), ("ZRANGE", k.members, 0, -1, "WITHSCORES"), ("TIME",)],
            keys=(k.holders, k.members),
        )
        if members and not isinstance(members[0], (list, tuple)):  # a flat reply: member, score, ...
            members = list(zip(members[::2], members[1::2], strict=True))
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        return PartitionedStats(
            partitions=parts,
            holders={int(p): h.decode("utf-8", "replace") for p, h in holders.items()},
            members={m.decode("utf-8", "replace"): (float(score) - now_ms) / 1000.0 for m, score in members},
        )


class _PartitionConsumer(Consumer[T]):
    """One held partition's consumer, feeding its member's key-ordered hand-out."""

    def __init__(self, member: PartitionedConsumer[T], index: int, queue: Queue[T]) -> None:
        super().__init__(
            queue,
            prefetch=member.prefetch,
            name=member.name,
            block_s=member.block_s,
            close_timeout_s=member.close_timeout_s,
        )
        self.index = index
        self._member = member
        self._parked: dict[bytes, asyncio.TimerHandle] = {}
        self._wait_only = True
        self._settle_keys = (*self._settle_keys, queue.keys.fence)

    async def _open(self) -> None:
        # Fence first: from here on, whoever held this partition before can neither take
        # nor settle in it, nor renew its lease there.
        keys = self.queue.keys
        token: bytes = await script("fence")(self.client.redis, (keys.fence,), (self.name,))
        self._fence = ((keys.fence,), (token,))
        self._settle_head = (token,)
        await super()._open()

    async def _fetch_loop(self) -> None:
        await self._await_previous_holders()
        await super()._fetch_loop()

    async def _await_previous_holders(self) -> None:
        """Fetch nothing until every earlier holder is gone: what it had in flight goes back
        to the front, oldest first, and none of its handlers can still run beside ours.
        A holder that is alive but fenced renews nothing, so this waits at most a lease."""
        keys, me = self.queue.keys, self.name.encode()
        failures = 0
        logged = False
        while self._state == 1:
            try:
                # The registry names them even when the leases are lost.
                listed: list[bytes] = await execute(
                    self.client.redis, "ZRANGE", keys.leases, 0, -1, keys=(keys.leases,)
                )
                listed += await execute(self.client.redis, "ZRANGE", keys.registry, 0, -1, keys=(keys.registry,))
                alive = await self._reap_expired(list(dict.fromkeys(m for m in listed if m != me)))
            except AioredmqError as exc:
                if permanent(exc):
                    raise
                failures += 1
                await self._pause_after_failure("waiting for the previous holder", exc, failures)
                continue
            if not alive:
                return
            if not logged:
                logged = True
                log.info("member %s waits for the previous holder of partition %d to stop", self.name, self.index)
            await anyio.sleep(self.queue.lease_s / 10)

    def _fenced(self) -> None:
        if not self._stopped:
            log.warning(
                "member %s: partition %d of %s has a new holder; giving it up",
                self.name,
                self.index,
                self._member.label,
            )
            self.stop_delivery()
            self._member._partition_lost(self.index, self)

    def _deliver(self, msgs: list[Message[T]], fetched: int) -> None:
        super()._deliver(msgs, fetched)
        self._member._wake.set()

    def _after_settle(self, msg: Message[T]) -> None:
        if msg._ref not in self._parked:
            self._member._key_done(self, msg)

    # A failed message stays in our in-flight list and its key stays blocked; it is
    # handed out again after its backoff. Its envelope in Redis keeps the attempt count
    # it arrived with, so acks name it by that count.

    def _retry(self, msg: Message[T], delay_s: float | None) -> None:
        self._parked[msg._ref] = asyncio.get_running_loop().call_later(delay_s or 0.0, self._redeliver, msg)

    def _redeliver(self, msg: Message[T]) -> None:
        if self._parked.pop(msg._ref, None) is not None and self._state == 1:
            self._back_to_head(msg)

    def _settle_release(self, msg: Message[T]) -> None:
        # A cancelled handler: while open, back to the head here, its key still blocked,
        # so nothing later of the key overtakes it (close returns it first, in order).
        if self._state != 1:
            super()._settle_release(msg)
        else:
            self._back_to_head(msg)

    def _back_to_head(self, msg: Message[T]) -> None:
        """Deliver ``msg`` again before anything else, counting the delivery that ended."""
        msg._settled = False
        msg._started = False
        msg.deliveries += 1
        self._ready.appendleft(msg)
        self._member._wake.set()
        self._member._settled.set()

    def _ack_tag(self, msg: Message[T]) -> bytes:
        return b"%b %b" % (msg.id.encode(), msg.raw.split(b" ", 3)[2])

    def _return_unstarted(self, msgs: list[Message[T]]) -> None:
        for msg in reversed(msgs):  # the oldest ends up first; the count says what was tried
            self._enqueue(msg.raw, b"F", with_attempts(msg.raw, msg.deliveries - 1), 0)

    def give_back_parked(self) -> None:
        """Closing: parked retries return to the front like unfinished deliveries."""
        for ref, handle in list(self._parked.items()):
            handle.cancel()
            msg = self._held.get(ref)
            if msg is not None:
                msg._settled = False
        self._parked.clear()

    @property
    def busy(self) -> bool:
        """Handed-out messages not settled yet, or parked retries."""
        return bool(self._parked) or self.running

    @property
    def running(self) -> bool:
        """Handed-out messages not settled yet."""
        return any(m is not None and m._started and not m._settled for m in self._held.values())


class _Handling:
    """The runner's handling of one message of a member: a cancel scope the member can
    cancel when the message's partition is given up or lost, and a note when it ends."""

    __slots__ = ("_member", "_msg", "_scope")

    def __init__(self, member: PartitionedConsumer[Any], msg: Message[Any]) -> None:
        self._member = member
        self._msg = msg
        self._scope = anyio.CancelScope()

    def __enter__(self) -> None:
        self._scope.__enter__()
        self._member._handlers[self._msg] = self._scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self._scope.__exit__(exc_type, exc, tb)
        finally:
            self._member._handler_ended(self._msg)


class PartitionedConsumer(Generic[T]):
    """One member of a partitioned queue's consumers; iterate it like any consumer."""

    def __init__(
        self,
        pq: PartitionedQueue[T],
        *,
        prefetch: int,
        name: str | None,
        block_s: float,
        close_timeout_s: float,
        handover_grace_s: float,
    ) -> None:
        check_positive("prefetch", prefetch, integer=True)
        check_positive("block_s", block_s)
        check_positive("close_timeout_s", close_timeout_s)
        check_positive("handover_grace_s", handover_grace_s, zero=True)
        self.pq = pq
        self.client = pq.client
        self.label = pq.name
        self.name = check_name("name", name) if name is not None else default_consumer_name()
        self.prefetch = prefetch
        self.block_s = block_s
        self.close_timeout_s = close_timeout_s
        self.handover_grace_s = handover_grace_s
        self._lease_ms = int(pq.lease_s * 1000)
        self._subs: dict[int, _PartitionConsumer[T]] = {}
        self._leaving: set[int] = set()  # being handed over
        self._giving_up: set[int] = set()  # handed over; the next balance call releases them
        self._busy: dict[tuple[int, str | None], Message[T]] = {}
        self._handlers: dict[Message[T], anyio.CancelScope] = {}  # the runner's, running
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # a handed-out message was settled
        self._balancing = anyio.Lock()  # a balance and the end of a hand-over never interleave
        self._tasks = Tasks(on_crash=self._crashed)
        self._error: BaseException | None = None
        self._stopped = False
        self._state = 0
        self._rr = 0
        self.fair_share = 0
        self.members = 0

    @property
    def held_partitions(self) -> list[int]:
        return sorted(self._subs)

    @property
    def held(self) -> int:
        return sum(sub.held for sub in self._subs.values())

    @property
    def closed(self) -> bool:
        return self._state == 2

    def _crashed(self, exc: BaseException) -> None:
        self._error = exc
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state:
            raise ClosedError("a consumer can be opened only once; call consume() again")
        self.client.check_open()
        self._state = 1
        self.client.members.add(self)
        try:
            await until_done(self._open_checked, f"member {self.name} of {self.label}: opening")
        except BaseException:
            self._state = 2
            self.client.members.discard(self)
            with anyio.CancelScope(shield=True):
                await self._close_subs(list(self._subs))
                await self._call_balance(leave=True)
            raise
        self._tasks.spawn(self._balance_loop(), f"aioredmq-balance-{self.name}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, deadline: float | None = None) -> None:
        """Stop, give back what is unfinished in every partition, release them, leave;
        within ``close_timeout_s`` (or by ``deadline``, if sooner), past which what is left
        is recovered once the leases expire."""
        if self._state != 1:
            self._state = 2
            return
        self._state = 2
        self._wake.set()
        self.client.members.discard(self)
        own = anyio.current_time() + self.close_timeout_s
        deadline = own if deadline is None else min(own, deadline)
        with anyio.CancelScope(shield=True):
            await self._tasks.aclose()
            await self._close_subs(list(self._subs), deadline=deadline)
            left = False
            try:
                with anyio.CancelScope(deadline=deadline):
                    await self._call_balance(leave=True)
                    left = True
            except AioredmqError as exc:
                log.warning("member %s of %s did not leave cleanly (%s); its leases expire", self.name, self.label, exc)
            else:
                if not left:
                    log.warning("member %s of %s could not leave in time; its leases expire", self.name, self.label)

    async def _close_subs(self, indexes: list[int], *, cancel: bool = False, deadline: float | None = None) -> None:
        """Close the consumers of ``indexes`` (together, by ``deadline``); with ``cancel``,
        cancel their handlers first (the partition is someone else's). A key whose handler
        still runs stays blocked here until it ends, whoever holds the partition next in
        this member."""
        subs = [sub for sub in (self._subs.pop(index, None) for index in indexes) if sub is not None]
        async with anyio.create_task_group() as tg:
            for sub in subs:
                if cancel:
                    self._cancel_handlers(sub)
                sub.give_back_parked()
                tg.start_soon(partial(sub.aclose, deadline=deadline))
        for sub in subs:
            for key in [k for k, m in self._busy.items() if k[0] == sub.index and m not in self._handlers]:
                del self._busy[key]

    def _cancel_handlers(self, sub: _PartitionConsumer[T]) -> int:
        scopes = [scope for msg, scope in self._handlers.items() if msg._consumer is sub]
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    def _handles(self, sub: _PartitionConsumer[T]) -> bool:
        """Whether a handler of one of ``sub``'s messages still runs."""
        return sub.running or any(msg._consumer is sub for msg in self._handlers)

    def handling(self, msg: Message[T]) -> _Handling:
        """For the runner: enter around a handler of ``msg``, so that giving up or losing
        its partition cancels it, and its key stays blocked until it has ended."""
        return _Handling(self, msg)

    def _handler_ended(self, msg: Message[T]) -> None:
        self._handlers.pop(msg, None)
        sub = msg._consumer
        assert isinstance(sub, _PartitionConsumer)
        key = (sub.index, msg.headers.get(KEY_HEADER))
        if self._subs.get(sub.index) is not sub and self._busy.get(key) is msg:
            del self._busy[key]  # its partition was closed while it ran
            self._wake.set()
        self._settled.set()

    # -- balancing -------------------------------------------------------------------

    async def _call_balance(self, *, leave: bool = False) -> list[int]:
        k = self.pq.keys
        giving_up = sorted(self._giving_up)
        fair, live, *mine = await script("partition_balance")(
            self.client.control,
            (k.members, k.holders, k.holds),
            (self.name, self._lease_ms, len(self.pq.partitions), int(leave), *giving_up),
        )
        self._giving_up.difference_update(giving_up)
        self.fair_share, self.members = int(fair), int(live)
        return [int(p) for p in mine]

    async def _balance(self) -> None:
        mine = set(await self._call_balance())
        lost = [i for i in self._subs if i not in mine]
        if lost:
            log.warning("member %s lost partitions %s of %s (its lease lapsed)", self.name, lost, self.label)
            await self._close_subs(lost, cancel=True)
            self._leaving.difference_update(lost)
        for index in sorted(mine - set(self._subs)):
            sub = _PartitionConsumer(self, index, self.pq.partitions[index])
            await sub.__aenter__()
            self._subs[index] = sub
            log.info("member %s took partition %d of %s", self.name, index, self.label)
        extra = len(mine) - len(self._leaving) - self.fair_share
        if extra > 0:
            for index in sorted(mine - self._leaving, reverse=True)[:extra]:
                self._leaving.add(index)
                self._subs[index].stop_delivery()
                self._tasks.spawn(self._hand_over(index), f"aioredmq-handover-{self.name}-{index}")
        self._wake.set()

    async def _hand_over(self, index: int) -> None:
        """Let running handlers finish, give the rest back, then release the partition."""
        sub = self._subs.get(index)
        with anyio.move_on_after(self.handover_grace_s):
            while sub is not None and sub.busy and self._subs.get(index) is sub:
                self._settled.clear()
                await self._settled.wait()
        if sub is not None and self._subs.get(index) is sub and self._handles(sub):
            # Past the grace: the runner's handlers are cancelled (their messages go back
            # to the front); the partition is released only once none of them runs, or a
            # new holder could start a key's next message beside its previous one.
            cancelled = self._cancel_handlers(sub)
            log.warning(
                "member %s: handing partition %d of %s over after %.1f s; %s",
                self.name,
                index,
                self.label,
                self.handover_grace_s,
                f"cancelling {cancelled} running handler(s)" if cancelled else "waiting for its running handlers",
            )
            while self._subs.get(index) is sub and self._handles(sub):
                self._settled.clear()
                await self._settled.wait()
        async with self._balancing:
            if sub is None or self._subs.get(index) is not sub:
                return
            await self._close_subs([index])
            self._leaving.discard(index)
            # Given up in Redis by the next balance call, this one or a later one if Redis
            # does not answer now: until then the hold lapses unrenewed, and is not taken back.
            self._giving_up.add(index)
            try:
                await self._call_balance()
            except AioredmqError as exc:
                log.warning(
                    "member %s of %s: releasing partition %d failed (%s); the next balance releases it",
                    self.name,
                    self.label,
                    index,
                    exc,
                )
                return
        log.info("member %s handed partition %d of %s over", self.name, index, self.label)

    async def _open_checked(self) -> None:
        # As a consumer opens: the version check is retried with the first balance.
        await self.client.check_server()
        await self._balance_once()

    async def _balance_once(self) -> None:
        async with self._balancing:
            await self._balance()

    def _partition_lost(self, index: int, sub: _PartitionConsumer[T]) -> None:
        """A script refused ``sub``'s token: close it now rather than at the next balance."""

        async def drop() -> None:
            async with self._balancing:
                if self._subs.get(index) is sub:
                    await self._close_subs([index], cancel=True)
                    self._leaving.discard(index)

        if self._state == 1:
            self._tasks.spawn(drop(), f"aioredmq-fenced-{self.name}-{index}")

    async def _balance_loop(self) -> None:
        """Renew holds every ``lease_s / 3``; after a failure, retry sooner, whatever it was:
        a member that stopped balancing would keep consuming partitions it no longer holds."""
        interval = self.pq.lease_s / 3
        while self._state == 1:
            await anyio.sleep(interval)
            await until_done(self._balance_once, f"member {self.name} of {self.label}: balancing")

    # -- hand-out in key order -------------------------------------------------------

    def _key_done(self, sub: _PartitionConsumer[T], msg: Message[T]) -> None:
        key = (sub.index, msg.headers.get(KEY_HEADER))
        if self._busy.get(key) is msg:
            del self._busy[key]
            self._wake.set()
        self._settled.set()

    def stop_delivery(self) -> None:
        """Hand out no more messages: iterators end; what is buffered returns on close."""
        self._stopped = True
        self._wake.set()

    def __aiter__(self) -> Self:
        return self

    def _pick(self) -> Message[T] | None:
        subs = [s for i, s in sorted(self._subs.items()) if i not in self._leaving and not s._stopped]
        for turn in range(len(subs)):
            sub = subs[(self._rr + turn) % len(subs)]
            ready: deque[Message[T]] = sub._ready
            for position, msg in enumerate(ready):
                key = (sub.index, msg.headers.get(KEY_HEADER))
                holder = self._busy.get(key)
                if holder is None or holder is msg:
                    del ready[position]
                    if key[1] is not None:
                        self._busy[key] = msg
                    msg._started = True
                    sub.stats.delivered += 1
                    if sub._metrics is not None:
                        sub._metrics.delivered(sub.label, msg.deliveries)
                    self._rr = (self._rr + turn + 1) % len(subs)
                    return msg
        return None

    async def __anext__(self) -> Message[T]:
        if self._state == 0:
            raise ClosedError("the consumer is not open: use 'async with pq.consume()'")
        while True:
            if self._stopped or self._state == 2:
                self.client.check_open()  # closed with its client: an error, not the end
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            msg = self._pick()
            if msg is not None:
                return msg
            self._wake.clear()
            await self._wake.wait()
