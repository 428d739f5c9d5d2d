"""Background tasks owned by a long-lived object (a client or a consumer).

These objects are opened in one task and may be closed in another (test fixtures,
framework lifespans), so they cannot hold a task group open between ``__aenter__``
and ``__aexit__``. They own their tasks instead: ``spawn`` keeps a reference and
logs a crash; ``aclose`` cancels every task and waits until all have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ("Gate", "Tasks", "cancel_and_wait")

log = logging.getLogger("aioredmq")


class Gate:
    """Where tasks wait for work. ``open(n)`` lets ``n`` waiters through, one per item
    that arrived; ``open_all()`` lets every one through. Unlike an Event, one message
    wakes one of a runner's idle workers, not all of them."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.open(1)  # let through, then cancelled: the item is someone else's
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def open(self, n: int) -> None:
        waiters = self._waiters
        while n > 0 and waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def open_all(self) -> None:
        self.open(len(self._waiters))


class Tasks:
    def __init__(self, on_crash: Callable[[BaseException], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_crash = on_crash

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s crashed", task.get_name(), exc_info=exc)
            if self._on_crash is not None:
                self._on_crash(exc)

    async def aclose(self) -> None:
        """Cancel every task and wait until all have ended (shielded from the caller's cancel)."""
        while self._tasks:
            await cancel_and_wait(*self._tasks)


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel until done. redis-py can absorb a cancel that lands while a command starts
    (the command then runs to its end, a whole blocking timeout), so one is not enough."""
    with anyio.CancelScope(shield=True):
        pending = set(tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.05)
