"""The reliable list consumer: fetch into an in-flight list, deliver, settle in batches.

Three tasks run per consumer:

* **fetch**: while it holds fewer than ``prefetch`` messages, one ``take`` script call
  moves a batch from ready into this consumer's in-flight list; when ready is empty,
  ``BLMOVE`` waits on a dedicated connection. A lost reply (the move may have
  happened) is repaired by adopting whatever sits in the in-flight list unknown to us.
* **settle**: acks, nacks, dead-letters and returns are queued and sent together as
  one ``settle`` script call; a message leaves the held set only once Redis confirms.
* **timer**: one ``heartbeat`` script call renews the lease, tells when the next delayed
  message is due and names expired consumers, which it then reaps; it runs every
  ``lease_s / 3``. At the earliest due time it knows of, it moves due delayed messages
  (publishes and retries alike) to ready.

Closing stops the fetch, returns what was never handed out to the front of ready
(delivery count unchanged), returns what was handed out but not settled (count raised),
flushes every settle and deregisters.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .base_consumer import BaseConsumer, ConsumerStats, delivered
from .commands import execute
from .delayed import DueTimer
from .envelope import decode, with_attempts
from .errors import TRANSIENT, AioredmqError, DecodeError, permanent
from .message import Message
from .scripts import script

if TYPE_CHECKING:
    from .queue import Queue

__all__ = ("Consumer", "ConsumerStats")

log = logging.getLogger("aioredmq.consumer")
T = TypeVar("T")

_REAP_BATCH = 16


class Consumer(BaseConsumer[T]):
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
        super().__init__(
            queue, label=queue.name, prefetch=prefetch, name=name, block_s=block_s, close_timeout_s=close_timeout_s
        )
        self.queue = queue
        keys = queue.keys
        self._inflight = keys.inflight(self.name)
        self._take_keys = (keys.ready, self._inflight, keys.leases, keys.registry)
        self._settle_keys = (self._inflight, keys.ready, keys.delayed, keys.dead, keys.scheduled, keys.done)
        self._done_key = keys.done
        self._due = DueTimer(queue.client, keys, keys.ready, "list", self._timer_wake.set)
        # Take at most half the prefetch per call: the next batch is on its way while this
        # one is handled, instead of fetch, handle and settle taking turns.
        self._take_max = max(1, prefetch // 2)
        self._look_for_orphans = False
        self._check_held = False  # the lease lapsed: look for held messages reaped meanwhile
        # A partition's consumer: the fence key and its token, passed to take and heartbeat
        # (settle gets them through _settle_keys and _settle_head).
        self._fence: tuple[tuple[str, ...], tuple[bytes, ...]] = ((), ())
        # Block without moving (BLMOVE ready ready), then move by take: every move into a
        # fenced consumer's in-flight list is then checked inside a script.
        self._wait_only = False

    async def _open(self) -> None:
        await self._tick()
        await self._recover_own_leftovers()

    async def _return_strays(self) -> None:
        # A blocking move cancelled on close may have landed. What it moved is newer than
        # every message held, so it goes to the front first, and the older ones in front of it.
        await self._return_orphans()

    async def _close_in_redis(self) -> None:
        await self._return_orphans()  # nothing should be left by now; cheap to make sure
        keys = self.queue.keys
        await script("deregister")(
            self.client.redis, (keys.leases, self._inflight, keys.registry, keys.lease_lengths), (self.name,)
        )

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
            await self._wait_for_room()
            try:
                if failures or self._look_for_orphans:
                    self._look_for_orphans = False
                    await self._adopt_orphans()
                    failures = 0
                    continue  # adoption may have filled the room: check it again
                room = min(self.prefetch - len(self._held), self._take_max)
                fence_keys, token = self._fence
                taken = (
                    []
                    if idle
                    else await take(conn, self._take_keys + fence_keys, (room, self.name, self._lease_ms, *token))
                )
                if taken == -1:
                    self._fenced()
                    return
                items = taken
                if not items and self._wait_only:
                    item = await execute(conn, "BLMOVE", ready, ready, "RIGHT", "RIGHT", self.block_s, keys=(ready,))
                    idle = item is None
                    continue
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
            except AioredmqError as exc:
                if self._state != 1:
                    return
                if permanent(exc):
                    self._fail("fetch", exc)
                    return
                # Over maxmemory BLMOVE is refused (it may grow memory); the take script is
                # not, and moves what there is: back to it, as after any failure.
                idle = False
                failures += 1
                await self._pause_after_failure("fetch", exc, failures)
                continue
            self._accept(items)

    def _accept(self, items: list[bytes]) -> None:
        """Take ownership of envelopes now in our in-flight list (oldest first)."""
        # _accept_one, unrolled: this runs for every message fetched.
        held, decode_one, msgs = self._held, self._decode, []
        for raw in items:
            try:
                env, body = decode_one(raw)
            except (DecodeError, RecursionError) as exc:
                self._undecodable(raw, raw, exc)
                continue
            msg = Message(self, raw, raw, env, body, env.attempts + 1)
            held[raw] = msg
            msgs.append(msg)
        self._deliver(msgs, len(items))

    async def _adopt_orphans(self) -> None:
        """After a lost reply: what our in-flight list holds that we do not know is ours."""
        listed, settled = await self._listing(self._list_inflight())
        orphans = [raw for raw in reversed(listed) if raw not in self._held and raw not in settled]
        if orphans:
            self.stats.adopted += len(orphans)
            log.info("consumer %s adopted %d message(s) moved by a lost reply", self.name, len(orphans))
            self._accept(orphans)

    async def _list_inflight(self) -> list[bytes]:
        """Our in-flight list as Redis has it, newest first."""
        listed: list[bytes] = await execute(self.client.redis, "LRANGE", self._inflight, 0, -1, keys=(self._inflight,))
        return listed

    async def _return_orphans(self) -> None:
        listed, settled = await self._listing(self._list_inflight())
        args: list[Any] = [*self._settle_head, 0]
        for raw in listed:  # newest first: each goes to the front, so the oldest ends first
            if raw not in self._held and raw not in settled:
                args += (raw, b"F", raw, 0)
        if len(args) > 1:
            await script("settle")(self.client.redis, self._settle_keys, args)

    async def _recover_own_leftovers(self) -> None:
        """A consumer restarted under a fixed name finds its last life's in-flight list."""
        listed = await self._list_inflight()
        if listed:
            log.warning("consumer %s found %d message(s) left from a previous run", self.name, len(listed))
            for raw in listed:
                try:
                    deliveries = decode(raw).attempts + 1
                except DecodeError:
                    deliveries = 1
                self._release(raw, raw, deliveries, "delivery did not finish (consumer restarted)")
            await self._flush_settles()

    # -- settling --------------------------------------------------------------------

    def _ack_tag(self, msg: Message[T]) -> bytes:
        # An ack names the delivery by id and attempt count, not by its (maybe large) bytes.
        return b"%b %d" % (msg.id.encode(), msg.deliveries - 1)

    def _return_unstarted(self, msgs: list[Message[T]]) -> None:
        for msg in reversed(msgs):  # each goes to the front: the oldest ends up first
            self._enqueue(msg.raw, b"F", msg.raw, 0)

    def _release(self, ref: bytes, raw: bytes, deliveries: int, reason: str) -> None:
        """Front of ready with the count raised, or dead-letter at the limit."""
        limit = self.retry.max_deliveries
        if deliveries >= limit:
            self._dead(ref, raw, f"{reason}; {delivered(deliveries, limit)}", deliveries)
            return
        try:
            decode(raw)
        except DecodeError as exc:
            self._dead(ref, raw, f"undecodable: {exc}")
            return
        self.stats.returned += 1
        self._enqueue(ref, b"F", with_attempts(raw, deliveries), 0)

    def _retry(self, msg: Message[T], delay_s: float | None) -> None:
        assert delay_s is not None
        retry = with_attempts(msg.raw, msg.deliveries)
        if delay_s <= 0:
            self._enqueue(msg.raw, b"B", retry, 0)
            return
        self._enqueue(msg.raw, b"D", retry, max(1, int(delay_s * 1000)))
        self._due.hint(delay_s)

    # -- timer: heartbeat, reap, promote ---------------------------------------------

    async def _tick(self) -> list[bytes]:
        """Renew the lease and learn the next due time; return the consumers whose lease expired."""
        keys = self.queue.keys
        asked_at = time.monotonic()
        fence_keys, token = self._fence
        next_ms, in_flight, lapsed, *expired = await script("heartbeat")(
            self.client.control,
            (keys.leases, keys.delayed, self._inflight, keys.registry, keys.lease_lengths, *fence_keys),
            (self.name, self._lease_ms, _REAP_BATCH, *token),
        )
        if in_flight == -1:
            self._fenced()
            return []
        self._due.learned(next_ms, asked_at)
        if lapsed and self._held and self._state == 1:
            # Our lease lapsed (a stall, a lost entry): a reap may have given what we hold
            # to others. What we have not handed out yet is no longer ours to hand out.
            self._check_held = True
        if in_flight > len(self._held):
            # More in our list than we know of: a move whose reply never came (or a take in
            # flight right now). The fetch loop looks, between its own commands.
            self._look_for_orphans = True
        return list(expired)

    async def _drop_reaped(self) -> None:
        """After our lease lapsed: drop what we hold that our in-flight list no longer has
        (a reap returned it to ready; whoever takes it next handles it)."""
        listed, settled = await self._listing(self._list_inflight())
        self._check_held = False
        present = set(listed)
        self._lost_refs.intersection_update(self._held)
        gone = [ref for ref in self._held if ref not in present and ref not in settled]
        self._log_dropped(sum(self._lost(ref) for ref in gone))

    def _fenced(self) -> None:
        """Another member holds this partition now (only a partition's consumer has a token)."""

    async def _reap_expired(self, members: list[bytes], *, force: bool = False) -> int:
        """Recover what each expired consumer held. Members are used as the bytes they are:
        a member some other writer put there is reaped (and later forgotten) like any other.
        ``force``: reap even live leases (a partition's previous holder lost it).
        Returns how many were alive and left alone."""
        me = self.name.encode()
        keys = self.queue.keys
        alive = 0
        for member in members:
            if member == me:
                continue
            requeued, dead = await script("reap")(
                self.client.control,
                (keys.leases, keys.inflight_of(member), keys.ready, keys.dead, keys.registry, keys.lease_lengths),
                (member, self.queue.retry.max_deliveries, self._lease_ms, int(force)),
            )
            alive += requeued < 0
            if requeued >= 0 and (requeued or dead):
                self.stats.reaped_consumers += 1
                log.warning(
                    "consumer %s: lease of %s expired; %d message(s) back to ready, %d dead-lettered",
                    self.name,
                    member.decode("utf-8", "replace"),
                    requeued,
                    dead,
                )
        return alive

    async def _timer_loop(self) -> None:
        interval = self.queue.lease_s / 3
        next_beat = time.monotonic() + interval
        while self._state == 1:
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + interval
                    await self._reap_expired(await self._tick())
                    if self._check_held:
                        await self._drop_reaped()
                if self._due.is_due():
                    await self._due.promote()
            except TRANSIENT as exc:
                self.stats.connection_errors += 1
                log.warning("consumer %s: heartbeat failed (%s)", self.name, exc)
                self._due.forget()  # learn it again from the next successful tick
            except AioredmqError:
                log.exception("consumer %s: heartbeat failed", self.name)
            due = self._due.due
            wake = next_beat if due is None else min(next_beat, due)
            self._timer_wake.clear()
            with anyio.move_on_after(max(0.0, wake - time.monotonic())):
                await self._timer_wake.wait()
