"""The stream consumer: one member of a consumer group.

Three tasks run per consumer, as for queues:

* **fetch**: first the entries this consumer's name still holds from a previous life
  (its pending entries), then new entries with ``XREADGROUP ... >`` and ``BLOCK`` on a
  dedicated connection. Every ``lease_s / 3`` (and at least every ``block_s``) a
  recovery sweep (``XAUTOCLAIM``) takes entries idle past the lease: their consumer
  died, froze or gave them back. An entry whose delivery count passes
  ``max_deliveries`` goes to the group's dead-letter list.
* **settle**: acks, dead-letters and releases go together as one ``xsettle`` call.
* **timer**: every ``lease_s / 3`` it restarts the idle clock of every entry it holds,
  whether waiting or running, so a live consumer is never robbed however long a
  handler takes; it delivers nacked entries again when their backoff ends; and at the
  earliest due time it knows of, it appends due delayed messages to the stream.

A nacked entry stays pending under this consumer until its retry is due. A released
entry (closing, a cancelled handler) gets an idle time of one lease, so the next
recovery sweep of any consumer in the group takes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .base_consumer import BaseConsumer, delivered
from .commands import execute
from .delayed import DueTimer
from .errors import AioredmqError, ResponseError, permanent
from .message import Message
from .scripts import script

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ("GROUP_HEADER", "StreamConsumer")

log = logging.getLogger("aioredmq.stream")
T = TypeVar("T")

GROUP_HEADER = "aioredmq-group"
"""Set on an entry that a dead-letter requeue appended: only this group delivers it."""

_LIST_PAGE = 1000
_SWEEP_CALLS = 10
_Listed = tuple[bytes, int, Any]  # entry id, delivery count, fields


def _group_lost(exc: AioredmqError) -> bool:
    """NOGROUP: the stream or its group does not exist (any more)."""
    return isinstance(exc, ResponseError) and exc.code == "NOGROUP"


def _as_is(response: Any, **options: Any) -> Any:
    return response


def _read_entries(reply: Any) -> list[tuple[bytes, Any]]:
    """The entries of an XREADGROUP reply of one stream, as the server sent it (RESP2: a
    list of [stream, entries]; RESP3: a map of stream to entries)."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [entries for _, entries in reply]
    return [(entry_id, fields) for entry_id, fields in streams[0]]


def _fields(raw: Any) -> dict[bytes, bytes]:
    """Entry fields as a script or XREADGROUP gives them (a flat list), or as a dict."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list):
        return dict(zip(raw[::2], raw[1::2], strict=False))
    return {}


def _triples(flat: list[Any]) -> list[_Listed]:
    return [(flat[i], int(flat[i + 1]), flat[i + 2]) for i in range(0, len(flat), 3)]


class StreamConsumer(BaseConsumer[T]):
    """Iterate with ``async with stream.consume(group) as c: async for msg in c``."""

    def __init__(
        self,
        stream: Stream[T],
        *,
        group: str,
        start: str,
        prefetch: int,
        name: str | None,
        block_s: float,
        close_timeout_s: float,
        forget_idle_consumers_s: float,
    ) -> None:
        super().__init__(
            stream,
            label=f"{stream.name}/{group}",
            prefetch=prefetch,
            name=name,
            block_s=block_s,
            close_timeout_s=close_timeout_s,
        )
        self.stream = stream
        self.group = group
        self._start = start
        keys = stream.keys
        self._key = keys.stream
        self._settle_script = script("xsettle")
        self._settle_keys = (keys.stream, keys.dead(group), keys.done(group))
        self._done_key = keys.done(group)
        self._settle_head = (group, self.name)
        self._take_max = max(1, prefetch // 2)
        self._forget_ms = int(forget_idle_consumers_s * 1000)
        self._sweep_interval = min(stream.lease_s / 3, self.block_s)
        self._next_sweep = 0.0
        self._cursor = b"0-0"
        self._resume_from: bytes | None = b"-"  # until this name's pending entries are listed
        # Nacked entries waiting for their retry: entry id -> (due, monotonic clock; message)
        self._parked: dict[bytes, tuple[float, Message[T]]] = {}
        # Given back (cancelled, closing), by when: a read cancelled on close may have handed
        # us entries unknown to us, and these are not such. Pruned after two leases, when
        # any sweep has taken them: the map stays as small as what one lease gives back.
        self._released: dict[bytes, float] = {}
        self._due = DueTimer(stream.client, keys, keys.stream, "stream", self._timer_wake.set)

    async def _open(self) -> None:
        await self.stream.create_group(self.group, self._start)
        # Renewals go through the control pool: connect it now, while Redis is idle, not at
        # the first renewal, where a handshake waiting behind a busy Redis can cost a lease.
        await self.client.control.ping()

    async def _recreate_group(self, exc: AioredmqError) -> None:
        """The group is gone (Redis restarted without persistence, the stream was deleted or
        flushed, a failover to a replica that never had it) while publishes may have gone
        on: XADD recreates the stream without the group. Create it again from the start of
        what the stream holds now, so nothing published after the loss is skipped; what the
        group had delivered before the loss and was never acked is gone with it."""
        created = await self.stream.create_group(self.group, "begin")
        self._cursor = b"0-0"
        if created:
            self.stats.groups_recreated += 1
            log.error(
                "consumer %s: group %r of stream %r was lost (%s); created it again from the "
                "start of what the stream holds now",
                self.name,
                self.group,
                self.stream.name,
                exc,
            )

    # -- fetch -----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._conn is not None
        conn = self._conn
        # The reply as sent: redis-py's parser would build a dict of every entry's fields,
        # which costs more than the rest of the fetch.
        conn.set_response_callback("XREADGROUP", _as_is)
        failures = 0
        while self._state == 1:
            await self._wait_for_room()
            try:
                if failures:
                    # A read whose reply was lost may have handed us entries: find them.
                    await self._adopt_orphans()
                    failures = 0
                    continue
                room = min(self.prefetch - len(self._held), self._take_max)
                if self._resume_from is not None:
                    await self._resume(room)
                    continue
                if time.monotonic() >= self._next_sweep and await self._sweep(room):
                    continue
                block_ms = max(1, int(min(self.block_s, self._next_sweep - time.monotonic()) * 1000))
                reply = await execute(
                    conn,
                    "XREADGROUP",
                    "GROUP",
                    self.group,
                    self.name,
                    "COUNT",
                    room,
                    "BLOCK",
                    block_ms,
                    "STREAMS",
                    self._key,
                    ">",
                    keys=(self._key,),
                )
            except AioredmqError as exc:
                if self._state != 1:
                    return
                if permanent(exc):
                    self._fail("fetch", exc)
                    return
                failures += 1
                if _group_lost(exc):
                    await self._recreate_group(exc)
                else:
                    await self._pause_after_failure("fetch", exc, failures)
                continue
            if reply:
                self._accept([(entry_id, 1, fields) for entry_id, fields in _read_entries(reply)])

    def _accept(self, entries: list[_Listed]) -> None:
        """Take ownership of entries now pending under this consumer (oldest first)."""
        limit = self.retry.max_deliveries
        msgs: list[Message[T]] = []
        for entry_id, deliveries, raw_fields in entries:
            if entry_id in self._held or entry_id in self._parked:
                continue
            if type(raw_fields) is list and len(raw_fields) == 2 and raw_fields[0] == b"m":
                raw = raw_fields[1]  # as aioredmq writes it; anything else is looked at closely
            else:
                fields = _fields(raw_fields)
                raw = fields.get(b"m")
            if raw is None:
                self._held[entry_id] = None
                described = b" ".join(k + b"=" + v for k, v in fields.items())
                self._dead(entry_id, described, "not an aioredmq entry: it has no field 'm'")
                continue
            if deliveries > limit:
                self._held[entry_id] = None
                self._dead(
                    entry_id,
                    raw,
                    f"delivered {deliveries - 1} times without an ack (max_deliveries={limit}): "
                    "its consumers failed, stopped or lost their lease",
                    deliveries - 1,
                )
                continue
            msg = self._accept_one(entry_id, raw, deliveries)
            if msg is None:
                continue
            target = msg.headers.get(GROUP_HEADER)
            if target is not None and target != self.group:
                msg._settled = True  # requeued for another group's dead letters: not ours
                self._enqueue(entry_id, b"A", entry_id, 0)
                continue
            msgs.append(msg)
        self._deliver(msgs, len(entries))

    def _listed(self, flat: list[Any]) -> list[_Listed]:
        entries = _triples(flat)
        trimmed = [e for e in entries if e[1] < 0]
        if trimmed:
            self._count_trimmed(len(trimmed))
            entries = [e for e in entries if e[1] >= 0]
        return entries

    def _count_trimmed(self, n: int) -> None:
        self.stats.trimmed += n
        log.warning(
            "consumer %s: %d pending entries of %s were deleted (trimmed) before anyone acked them",
            self.name,
            n,
            self.label,
        )

    async def _resume(self, room: int) -> None:
        """Deliver again what this consumer's name still holds from a previous life."""
        assert self._resume_from is not None
        flat = await script("xown")(
            self.client.redis, (self._key,), (self.group, self.name, self._resume_from, room, 1)
        )
        listed = len(flat) // 3
        entries = self._listed(flat)
        if entries:
            log.warning("consumer %s resumes %d entries it held before a restart", self.name, len(entries))
        self._resume_from = flat[-3] if listed == room else None
        self._accept(entries)

    async def _sweep(self, room: int) -> bool:
        """Claim entries idle past the lease; True if any were claimed."""
        claimed = 0
        for _ in range(_SWEEP_CALLS):
            forget = self._forget_ms if self._cursor == b"0-0" else 0
            cursor, trimmed, removed, *flat = await script("xclaim")(
                self.client.redis,
                (self._key,),
                (self.group, self.name, self._lease_ms, self._cursor, room - claimed, forget),
            )
            self._cursor = cursor
            if trimmed:
                self._count_trimmed(trimmed)
            if removed:
                log.info("consumer %s removed %d idle consumers of %s", self.name, removed, self.label)
            entries = _triples(flat)
            if entries:
                claimed += len(entries)
                self.stats.claimed += len(entries)
                log.warning(
                    "consumer %s recovered %d entries of %s idle past the lease", self.name, len(entries), self.label
                )
                self._accept(entries)
            if cursor == b"0-0" or claimed >= room:
                break
        # More may wait past where this sweep stopped: look again as soon as there is room.
        more = cursor != b"0-0" and claimed > 0
        self._next_sweep = time.monotonic() + (0.0 if more else self._sweep_interval)
        return claimed > 0

    async def _list_own(self) -> list[_Listed]:
        """Every entry pending under this consumer's name, oldest first."""
        out: list[_Listed] = []
        start = b"-"
        while True:
            flat = await script("xown")(self.client.redis, (self._key,), (self.group, self.name, start, _LIST_PAGE, 0))
            out += self._listed(flat)
            if len(flat) // 3 < _LIST_PAGE:
                return out
            start = flat[-3]

    async def _adopt_orphans(self) -> None:
        listing: Awaitable[list[_Listed]] = self._list_own()
        entries, settled = await self._listing(listing)
        orphans = [e for e in entries if e[0] not in self._held and e[0] not in self._parked and e[0] not in settled]
        if orphans:
            self.stats.adopted += len(orphans)
            log.info("consumer %s adopted %d entries read by a lost reply", self.name, len(orphans))
            self._accept(orphans)

    # -- settling --------------------------------------------------------------------

    def _ack_tag(self, msg: Message[T]) -> bytes:
        return msg._ref

    def _release_now(self, ref: bytes, deliveries_so_far: int) -> None:
        """Idle for a whole lease: the next recovery sweep of any consumer takes it."""
        self._remember_released(ref)
        self._enqueue(ref, b"R", b"%d" % self._lease_ms, deliveries_so_far)

    def _remember_released(self, ref: bytes) -> None:
        released = self._released
        now = time.monotonic()
        released[ref] = now
        oldest = next(iter(released.values()))
        if now - oldest > 2 * self.stream.lease_s:
            horizon = now - 2 * self.stream.lease_s
            for old in [r for r, at in released.items() if at < horizon]:
                del released[old]

    def _return_unstarted(self, msgs: list[Message[T]]) -> None:
        for msg in msgs:  # the claim that takes it counts the delivery again
            self._release_now(msg._ref, msg.deliveries - 1)

    def _release(self, ref: bytes, raw: bytes, deliveries: int, reason: str) -> None:
        limit = self.retry.max_deliveries
        if deliveries >= limit:
            self._dead(ref, raw, f"{reason}; {delivered(deliveries, limit)}", deliveries)
            return
        self.stats.returned += 1
        self._release_now(ref, -1)

    def _retry(self, msg: Message[T], delay_s: float | None) -> None:
        # The entry stays pending under this consumer, which delivers it again when due;
        # if this consumer stops first, a recovery sweep takes it after the lease.
        self._held.pop(msg._ref, None)
        self._parked[msg._ref] = (time.monotonic() + (delay_s or 0.0), msg)
        self._room.set()
        self._timer_wake.set()

    async def _close_in_redis(self) -> None:
        # Parked retries: claimable by any consumer when due (or after a lease, if later).
        parked, self._parked = self._parked, {}
        now = time.monotonic()
        for ref, (due, _) in parked.items():
            idle = max(0, self._lease_ms - int(max(0.0, due - now) * 1000))
            self._remember_released(ref)
            self._enqueue(ref, b"R", b"%d" % idle, -1)
        # A read cancelled on close may still have handed us entries: give them back.
        for entry_id, deliveries, _ in await self._list_own():
            if entry_id not in self._held and entry_id not in self._released:
                self._release_now(entry_id, max(0, deliveries - 1))
        await self._settled_all.wait()
        # Holding nothing: leave the group. Otherwise the name stays until what it
        # released is recovered, and then a sweep removes it once it idles long enough.
        redis, key = self.client.redis, self._key
        if not await script("xown")(redis, (key,), (self.group, self.name, "-", 1, 0)):
            await execute(redis, "XGROUP", "DELCONSUMER", key, self.group, self.name, keys=(key,))

    # -- timer: renew leases, deliver due retries ------------------------------------

    async def _settle_now(self, quads: list[tuple[bytes, bytes, bytes, int]]) -> list[int]:
        """Run one xsettle call of releases outside the settle queue; return the lost positions."""
        args: list[Any] = [*self._settle_head, 0]
        for quad in quads:
            args += quad
        lost: list[int] = await self._settle_script(self.client.control, self._settle_keys, args)
        return lost

    async def _renew(self) -> None:
        """Restart the idle clock of every entry held: a live consumer is never robbed."""
        lost = self._lost_refs
        if lost:
            lost.intersection_update(self._held)  # no longer ours: not renewed again
        refs = [ref for ref, msg in self._held.items() if msg is not None and not msg._settled and ref not in lost]
        refs += list(self._parked)
        dropped = 0
        for i in range(0, len(refs), _LIST_PAGE):
            chunk = refs[i : i + _LIST_PAGE]
            for position in await self._settle_now([(ref, b"R", b"0", -1) for ref in chunk]):
                dropped += self._lost(chunk[position - 1])
        self._log_dropped(dropped)

    def _lost(self, ref: bytes) -> bool:
        """Another consumer recovered an entry we hold (we froze past the lease), or it was trimmed."""
        if self._parked.pop(ref, None) is not None:
            log.warning("consumer %s: a parked retry was recovered by another consumer", self.name)
            return False
        return super()._lost(ref)

    async def _deliver_due(self) -> None:
        now = time.monotonic()
        due = [ref for ref, (when, _) in self._parked.items() if when <= now]
        if not due:
            return
        quads = [(ref, b"R", b"0", self._parked[ref][1].deliveries + 1) for ref in due]
        lost = set(await self._settle_now(quads))
        msgs: list[Message[T]] = []
        for position, ref in enumerate(due, 1):
            entry = self._parked.pop(ref, None)
            if entry is None or position in lost:
                continue
            old = entry[1]
            msg = self._accept_one(ref, old.raw, old.deliveries + 1)
            if msg is not None:
                msgs.append(msg)
        self._deliver(msgs, 0)

    def _next_due(self) -> float | None:
        return min((when for when, _ in self._parked.values()), default=None)

    async def _timer_loop(self) -> None:
        interval = self.stream.lease_s / 3
        next_renew = time.monotonic() + interval
        failures = 0
        while self._state == 1:
            try:
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + interval
                    await self._renew()
                await self._deliver_due()
                if self._due.is_due():
                    await self._due.promote()
                failures = 0
            except AioredmqError as exc:
                # Renewal is retried at the next beat; a due retry after a short pause.
                failures += 1
                await self._pause_after_failure("lease renewal", exc, failures)
            wake = min(t for t in (next_renew, self._next_due(), self._due.due) if t is not None)
            self._timer_wake.clear()
            with anyio.move_on_after(max(0.0, wake - time.monotonic())):
                await self._timer_wake.wait()
