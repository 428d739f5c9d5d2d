"""The handler runner: a concurrency limit, a handler timeout, retries and a graceful stop.

``concurrency`` worker tasks pull from one consumer (no task per message). A handler
runs in a shielded cancel scope, so cancelling the runner does not cut it short:
fetching stops, running handlers get ``grace_s`` to finish, the ones still running
then are cancelled and their messages given back, and the consumer's close returns
every prefetched message that never started. Cancellation always propagates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.lowlevel

from .config import check_positive
from .message import Message

if TYPE_CHECKING:
    from .queue import Queue

__all__ = ("run",)

T = TypeVar("T")


async def run(
    queue: Queue[T],
    handler: Callable[[Message[T]], Awaitable[object]],
    *,
    concurrency: int = 16,
    prefetch: int | None = None,
    handler_timeout_s: float | None = None,
    grace_s: float = 30.0,
    name: str | None = None,
) -> None:
    """Run ``handler`` on every message of ``queue`` until cancelled.

    A handler that returns acks its message; one that raises (or exceeds
    ``handler_timeout_s``) nacks it: retried with backoff, dead-lettered after
    ``max_deliveries``. ``prefetch`` defaults to twice ``concurrency``.
    """
    check_positive("concurrency", concurrency, integer=True)
    check_positive("grace_s", grace_s, zero=True)
    if handler_timeout_s is not None:
        check_positive("handler_timeout_s", handler_timeout_s)
    running: set[anyio.CancelScope] = set()
    stop_at: list[float] = []

    async with queue.consume(prefetch=prefetch or 2 * concurrency, name=name) as consumer:

        async def call(msg: Message[T]) -> None:
            async with msg.process():
                if handler_timeout_s is None:
                    await handler(msg)
                else:
                    with anyio.fail_after(handler_timeout_s):
                        await handler(msg)

        async def worker() -> None:
            while True:
                # A buffered message is returned without a checkpoint: check here, so no
                # handler starts once the runner is cancelled.
                await anyio.lowlevel.checkpoint_if_cancelled()
                try:
                    msg = await consumer.__anext__()
                except StopAsyncIteration:
                    return
                with anyio.CancelScope(shield=True) as scope:
                    if stop_at:
                        scope.deadline = stop_at[0]
                    running.add(scope)
                    try:
                        await call(msg)
                    finally:
                        running.discard(scope)

        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(worker, name=f"aioredmq-worker-{queue.name}-{i}")
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                stop_at.append(anyio.current_time() + grace_s)
                for scope in running:
                    scope.deadline = stop_at[0]
                raise
