"""Delayed delivery: messages that wait in a sorted set until they are due.

A delayed publish goes through its own coalescing producer and the ``schedule``
script: the message id goes into the ``delayed`` sorted set, scored by its due time
(server clock), and its envelope into the ``scheduled`` hash. Retries waiting for
their backoff use the same two keys. The ``promote`` script moves what is due to
ready (or appends it to the stream); any number of consumers may run it at once.

Consumers run it on a timer set from the earliest due time, never by polling. They
learn that time from three sources: the replies of their own scripts (heartbeat,
promote), their own retries, and a notice the schedule script publishes when a batch
brings the earliest due time forward. The notice is at most once; after the notice
subscription reconnects, every consumer looks again at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from .config import check_positive
from .errors import ConfigError
from .scripts import script

if TYPE_CHECKING:
    from .client import Client
    from .keys import _Keys

__all__ = ("DueTimer", "due_spec")

_PROMOTE_BATCH = 1000


def due_spec(delay: float | None, at: datetime | None) -> bytes | None:
    """How the schedule script is told a due time: ``+<ms>`` from now, or ``=<Unix ms>``."""
    if delay is not None and at is not None:
        raise ConfigError("pass delay= or at=, not both")
    if delay is not None:
        check_positive("delay", delay, zero=True)
        return b"+%d" % math.ceil(delay * 1000)
    if at is not None:
        if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
            raise ConfigError(f"at={at!r} must be a timezone-aware datetime, e.g. datetime.now(UTC) + timedelta(...)")
        return b"=%d" % math.ceil(at.timestamp() * 1000)
    return None


class DueTimer:
    """When one consumer should next run the mover, in ``time.monotonic()`` seconds."""

    def __init__(
        self, client: Client, keys: _Keys, target: str, mode: Literal["list", "stream"], wake: Callable[[], None]
    ) -> None:
        self._client = client
        self._keys = (keys.delayed, keys.scheduled, target)
        self._channel = keys.due
        self._mode = mode
        self._wake = wake
        self._stop: Callable[[], None] | None = None
        self.due: float | None = None
        self._hinted_at = 0.0

    async def open(self) -> None:
        """Hear of new earliest due times, then move what is due already."""
        if self._stop is None:  # a retried open watches once
            watcher = await self._client.due_watcher()
            self._stop = watcher.watch(self._channel, self.hint)
        await self.promote()

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def hint(self, delay_s: float | None) -> None:
        """Something is due in ``delay_s`` (``None``: a notice may have been missed, look now)."""
        self._hinted_at = now = time.monotonic()
        due = now + (delay_s or 0.0)
        if self.due is None or due < self.due:
            self.due = due
            self._wake()

    def learned(self, next_ms: int, asked_at: float) -> None:
        """A script's reply: the earliest due time was ``next_ms`` away (-1: nothing waits)
        when the script ran, which was after ``asked_at``: counting from there, a slow reply
        makes the timer early (a harmless empty move), never late."""
        learned = None if next_ms < 0 else asked_at + next_ms / 1000.0
        if self._hinted_at > asked_at and self.due is not None:
            # A notice came after the script ran: the reply cannot know of it.
            learned = self.due if learned is None else min(learned, self.due)
        self.due = learned

    def forget(self) -> None:
        """After a failure: wait for the next regular tick (or notice) to learn it again."""
        self.due = None

    def is_due(self) -> bool:
        return self.due is not None and time.monotonic() >= self.due

    async def promote(self) -> int:
        """Move one slice of what is due (at most 1,000 messages); return how many moved.
        When more is due, the timer stays due: the caller's loop moves the next slice after
        its other work, so a backlog of a million never holds back a lease renewal."""
        asked_at = time.monotonic()
        moved, next_ms = await script("promote")(self._client.redis, self._keys, (self._mode, _PROMOTE_BATCH))
        self.learned(next_ms, asked_at)
        return int(moved)
