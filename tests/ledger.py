"""A total-queue checker, after Jepsen's: what was published against what was handled.

A scenario keeps a :class:`Ledger` per message: the producer's outcome (confirmed, or
unconfirmed when the publish raised and the message may or may not exist), every handler
completion, and what sits in dead-letter after a full drain. Messages are named by their
body's unique number ``{"n": ...}`` rather than their id: a publish that raised returns
no ids, yet its messages may exist. :meth:`check` then asserts:

* **lost** = confirmed - (handled | dead) is empty;
* **unexpected** (handled or dead, never published) is empty;
* no id is both handled and dead-lettered;
* duplicates (handled more than once) are counted, and allowed only where the scenario
  injected a fault that explains them;
* at rest, ready + in flight + delayed + dead hold exactly the un-handled ids.

Each check's figures go into :data:`REPORTS`, which the test session prints as the
table of the README's "Guarantees, tested".
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

import aioredmq
from aioredmq.envelope import decode, decode_dead
from aioredmq.errors import DecodeError

from .helpers import as_bytes, lrange_bytes, single, stream_entries, stream_pending


@dataclass(frozen=True)
class Report:
    scenario: str
    messages: int
    lost: int
    duplicated: int
    dead: int
    recovery_s: float | None
    faults: str


REPORTS: list[Report] = []


def report(
    scenario: str,
    messages: int,
    *,
    lost: int = 0,
    duplicated: int = 0,
    dead: int = 0,
    recovery_s: float | None = None,
    faults: str,
) -> None:
    """The figures of a scenario checked by its own assertions rather than a ledger,
    called once those assertions passed."""
    REPORTS.append(Report(scenario, messages, lost, duplicated, dead, recovery_s, faults))


@dataclass
class Ledger:
    scenario: str
    confirmed: set[str] = field(default_factory=set)
    unconfirmed: set[str] = field(default_factory=set)
    handled: Counter[str] = field(default_factory=Counter)
    dead: set[str] = field(default_factory=set)
    faults: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    _fault_at: float | None = None
    _until_any: bool = False

    def published(self, ns: range | list[int]) -> None:
        self.confirmed.update(str(n) for n in ns)

    def maybe_published(self, ns: range | list[int]) -> None:
        """The publish raised: these may or may not be in Redis."""
        self.unconfirmed.update(str(n) for n in ns)

    def done(self, n: int | str, deliveries: int) -> None:
        """A handler finished with message ``n`` (its ack is on its way)."""
        self.handled[str(n)] += 1
        if (deliveries > 1 or self._until_any) and self._fault_at is not None and self.recovery_s is None:
            self.recovery_s = time.monotonic() - self._fault_at

    def done_records(self, records: list[bytes]) -> None:
        """Completions a worker process pushed as ``"<n> <deliveries>"`` (untimed: when
        they happened is not known here)."""
        for record in records:
            self.handled[record.split()[0].decode()] += 1

    def drained(self, source: aioredmq.Queue[Any]) -> Callable[[], Awaitable[bool]]:
        """A check: every confirmed message handled (or dead-lettered), and nothing waiting
        or held in Redis."""

        async def check() -> bool:
            unhandled = self.confirmed - set(self.handled)
            if unhandled and not unhandled <= await _dead_ids(single(source.client.redis), source, "default"):
                return False
            stats = await source.stats()
            return stats.ready == stats.in_flight == stats.delayed == 0

        return check

    def fault(self, what: str, *, timed: bool = False, until_any: bool = False) -> None:
        """Record an injected fault; ``timed``: recovery is measured from now until the
        first redelivered message (delivery 2 or more) is handled, or with ``until_any``
        until any message is."""
        self.faults.append(what)
        if timed:
            self._fault_at, self.recovery_s = time.monotonic(), None
            self._until_any = until_any

    async def check(
        self,
        raw: aioredis.Redis,
        source: aioredmq.Queue[Any] | aioredmq.Stream[Any],
        *,
        group: str = "default",
        duplicates_explained: bool = False,
    ) -> Report:
        """Read dead-letter and what Redis still holds, assert the checker's rules, record the figures."""
        self.dead = await _dead_ids(raw, source, group)
        handled = set(self.handled)
        published = self.confirmed | self.unconfirmed
        lost = self.confirmed - handled - self.dead
        unexpected = (handled | self.dead) - published
        both = handled & self.dead
        duplicated = sum(n - 1 for n in self.handled.values())
        assert not lost, f"{self.scenario}: {len(lost)} confirmed message(s) lost: {sorted(lost)[:5]}"
        assert not unexpected, f"{self.scenario}: handled but never published: {sorted(unexpected)[:5]}"
        assert not both, f"{self.scenario}: both handled and dead-lettered: {sorted(both)[:5]}"
        assert not duplicated or (duplicates_explained and self.faults), (
            f"{self.scenario}: {duplicated} duplicate(s) no injected fault explains: "
            f"{[i for i, n in self.handled.items() if n > 1][:5]}"
        )
        held = await held_ids(raw, source, group)
        unhandled = held - self.dead
        assert not unhandled, f"{self.scenario}: Redis still holds un-handled ids at rest: {sorted(unhandled)[:5]}"
        report = Report(
            self.scenario,
            len(self.confirmed),
            len(lost),
            duplicated,
            len(self.dead),
            self.recovery_s,
            ", ".join(self.faults) or "none",
        )
        REPORTS.append(report)
        return report


def _id_of(raw: bytes) -> str | None:
    """The body number of an envelope (``None`` if it is not one of the scenario's)."""
    try:
        n = json.loads(decode(raw).body)["n"]
    except (DecodeError, ValueError, TypeError, KeyError):
        return None
    return str(n)


async def _dead_ids(raw: aioredis.Redis, source: aioredmq.Queue[Any] | aioredmq.Stream[Any], group: str) -> set[str]:
    key = source.keys.dead if isinstance(source, aioredmq.Queue) else source.keys.dead(group)
    ids = {_id_of(decode_dead(r).raw) for r in await lrange_bytes(raw, key)}
    return {i for i in ids if i is not None}


async def held_ids(raw: aioredis.Redis, source: aioredmq.Queue[Any] | aioredmq.Stream[Any], group: str) -> set[str]:
    """Every message Redis still holds for the source: ready, every in-flight list, delayed
    and dead for a queue; pending, unread, delayed and dead for a stream's group."""
    ids: set[str] = set()
    if isinstance(source, aioredmq.Queue):
        keys = source.keys
        lists = [keys.ready] + [as_bytes(k).decode() async for k in raw.scan_iter(match=keys.inflight("*"))]
        for key in lists:
            ids |= {i for r in await lrange_bytes(raw, key) if (i := _id_of(r)) is not None}
    else:
        key = source.keys.stream
        pending = await stream_pending(raw, key, group) if await raw.exists(key) else {}
        last = await _last_delivered(raw, key, group)
        for entry_id, fields in await stream_entries(raw, key):
            wanted = entry_id in pending or _after(entry_id, last)
            if wanted and (i := _id_of(fields.get(b"m", b""))) is not None:
                ids.add(i)
    scheduled = [as_bytes(r) for r in await raw.hvals(source.keys.scheduled)]
    ids |= {i for r in scheduled if (i := _id_of(r)) is not None}
    return ids | await _dead_ids(raw, source, group)


async def _last_delivered(raw: aioredis.Redis, key: str, group: str) -> str:
    if not await raw.exists(key):
        return "0-0"
    for g in await raw.xinfo_groups(key):
        if as_bytes(g["name"]).decode() == group:
            return as_bytes(g["last-delivered-id"]).decode()
    return "0-0"


def _after(entry_id: str, last: str) -> bool:
    a, b = (tuple(int(x) for x in i.split("-")) for i in (entry_id, last))
    return a > b
