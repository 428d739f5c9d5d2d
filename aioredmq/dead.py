"""A dead-letter list: read it, requeue from it, purge it.

Queues keep one dead-letter list; streams keep one per consumer group. A requeued
message goes back in line with a fresh delivery count: to the back of a queue's ready
list, or appended to a stream as a new entry for that one group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from .commands import execute, pipeline
from .config import check_positive
from .envelope import DeadRecord, Envelope, decode, decode_dead
from .errors import DecodeError
from .scripts import script

if TYPE_CHECKING:
    from .client import Client

__all__ = ("DeadLetters",)

_PAGE = 1000


class DeadLetters:
    """One dead-letter list, newest record at the left."""

    def __init__(
        self,
        client: Client,
        key: str,
        target: str,
        mode: Literal["list", "stream"],
        requeued: Callable[[bytes, Envelope], bytes],
    ) -> None:
        self._client = client
        self.key = key
        self._target = target
        self._mode = mode
        self._requeued = requeued  # the envelope a requeue puts back, from the original

    async def count(self) -> int:
        n: int = await execute(self._client.redis, "LLEN", self.key, keys=(self.key,))
        return n

    async def list(self, limit: int) -> list[DeadRecord]:
        """The oldest ``limit`` records, oldest first."""
        check_positive("limit", limit, integer=True)
        raw = await execute(self._client.redis, "LRANGE", self.key, -limit, -1, keys=(self.key,))
        return [decode_dead(r) for r in reversed(raw)]

    async def move(self, ids: Iterable[str] | None, limit: int | None, *, requeue: bool) -> int:
        """Requeue or drop records, oldest first, reading the list a page at a time."""
        wanted = set(ids) if ids is not None else None
        if limit is not None:
            check_positive("limit", limit, integer=True)
        dead, move = self.key, script("move_dead")
        moved = kept = 0  # kept: records at the old end looked at and left in place
        while limit is None or moved < limit:
            page = await execute(self._client.redis, "LRANGE", dead, -(kept + _PAGE), -(kept + 1), keys=(dead,))
            args: list[Any] = [self._mode]
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
                args += (record, self._requeued(original, env) if requeue and env is not None else b"")
            if len(args) > 1:
                moved += int(await move(self._client.redis, (dead, self._target), args))
            if len(page) < _PAGE or (limit is not None and moved >= limit):
                break
        return moved

    async def purge(self, ids: Iterable[str] | None) -> int:
        """Delete records (all, or those whose message has one of ``ids``)."""
        if ids is None:
            n, _ = await pipeline(
                self._client.redis, [("LLEN", self.key), ("DEL", self.key)], keys=(self.key,), transaction=True
            )
            return int(n)
        return await self.move(ids, None, requeue=False)
