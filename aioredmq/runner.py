"""The handler runner: a concurrency limit, a handler timeout, retries and a graceful stop.

``concurrency`` worker tasks pull from one consumer (no task per message). The
workers run under one shielded cancel scope, so cancelling the runner does not cut
handlers short: delivery stops at once, running handlers get ``grace_s`` to finish
(the shielded scope's deadline), the ones still running then are cancelled and their
messages given back, and the consumer's close returns every prefetched message that
never started. Cancellation always propagates to the caller.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio

from .base_consumer import BaseConsumer
from .config import check_positive
from .errors import ConfigError
from .idempotency import Idempotency
from .message import Message, settle_outcome
from .partitioned import PartitionedConsumer, PartitionedQueue
from .stream import Stream

if TYPE_CHECKING:
    from .queue import Queue

__all__ = ("run",)

T = TypeVar("T")


async def run(
    queue: Queue[T] | Stream[T] | PartitionedQueue[T],
    handler: Callable[[Message[T]], Awaitable[object]],
    *,
    group: str | None = None,
    concurrency: int = 16,
    prefetch: int | None = None,
    handler_timeout_s: float | None = None,
    grace_s: float = 30.0,
    name: str | None = None,
    idempotency: Idempotency | None = None,
    opened: Callable[[], None] | None = None,
) -> None:
    """Run ``handler`` on every message of ``queue`` (or of a stream, as a member of
    ``group``, by default ``"default"``) until cancelled.

    A handler that returns acks its message; one that raises (or exceeds
    ``handler_timeout_s``) nacks it: retried with backoff, dead-lettered after
    ``max_deliveries``. ``prefetch`` defaults to twice ``concurrency``, and at least 64: a
    handful of messages per round trip costs more in round trips than it saves.
    With ``idempotency``, a message whose id is marked processed is acked without
    running the handler, and a success writes the marker with the ack. ``opened`` is
    called once the consumer is open (it waits for Redis first). On a partitioned queue,
    ``grace_s`` is also how long a partition handed over to another member waits for its
    running handlers before cancelling them.
    """
    check_handler(handler)
    check_positive("concurrency", concurrency, integer=True)
    check_positive("grace_s", grace_s, zero=True)
    if handler_timeout_s is not None:
        check_positive("handler_timeout_s", handler_timeout_s)
    prefetch = prefetch or max(2 * concurrency, 64)
    consumer: BaseConsumer[T] | PartitionedConsumer[T]
    if isinstance(queue, PartitionedQueue):
        if group is not None:
            raise ConfigError(f"group={group!r} applies to streams; {queue!r} is a partitioned queue")
        consumer = queue.consume(prefetch=prefetch, name=name, handover_grace_s=grace_s)
    elif isinstance(queue, Stream):
        consumer = queue.consume(group or "default", prefetch=prefetch, name=name)
    elif group is not None:
        raise ConfigError(f"group={group!r} applies to streams; {queue!r} is a queue")
    else:
        consumer = queue.consume(prefetch=prefetch, name=name)
    async with consumer:
        if opened is not None:
            opened()
        shield = anyio.CancelScope(shield=True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_workers, consumer, handler, concurrency, handler_timeout_s, idempotency, shield)
                try:
                    await anyio.sleep_forever()
                finally:
                    consumer.stop_delivery()
                    shield.deadline = anyio.current_time() + grace_s
        except BaseExceptionGroup as eg:
            # Every worker raises the consumer's one error (a wrong key type, a missing
            # permission): raise it as itself, so `except aioredmq.AioredmqError` works.
            errors = {id(e): e for e in _leaves(eg) if not isinstance(e, anyio.get_cancelled_exc_class())}
            if len(errors) == 1:
                raise next(iter(errors.values())) from None
            raise


def check_handler(handler: object) -> None:
    """Refuse, before anything is taken, a handler that is not an async function: a plain
    ``def`` would run its side effects on every delivery and fail each one (its result
    cannot be awaited), and a non-callable would dead-letter every message."""
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    if not callable(target):
        raise TypeError(f"the handler must be an async function taking a Message, not {type(handler).__name__}")
    if inspect.iscoroutinefunction(target):
        return
    if not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__):
        return  # an object with an `async def __call__`
    raise TypeError(
        f"the handler {getattr(target, '__qualname__', repr(target))} is not an async function: "
        "define it with `async def` (to run blocking code, await anyio.to_thread.run_sync in it)"
    )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def _workers(
    consumer: BaseConsumer[T] | PartitionedConsumer[T],
    handler: Callable[[Message[T]], Awaitable[object]],
    concurrency: int,
    handler_timeout_s: float | None,
    idempotency: Idempotency | None,
    shield: anyio.CancelScope,
) -> None:
    client = consumer.client
    metrics, tracing = client.metrics, client.tracing

    async def call(msg: Message[T]) -> None:
        if tracing is not None:
            with tracing.process(consumer.label, msg):
                await timed(msg)
        else:
            await timed(msg)

    async def timed(msg: Message[T]) -> None:
        if metrics is None:
            await bounded(msg)
            return
        start = time.perf_counter()
        ok = False
        try:
            await bounded(msg)
            ok = True
        finally:
            metrics.handled(consumer.label, time.perf_counter() - start, ok)

    async def bounded(msg: Message[T]) -> None:
        if handler_timeout_s is None:
            await handler(msg)
        else:
            try:
                with anyio.fail_after(handler_timeout_s) as scope:
                    await handler(msg)
            except TimeoutError as exc:
                if not scope.cancelled_caught:
                    raise  # the handler's own timeout, with its own message
                # anyio's TimeoutError says nothing; the dead-letter reason is built from this.
                raise TimeoutError(f"handler timed out after {handler_timeout_s:g} s") from exc

    plain = handler_timeout_s is None and metrics is None and tracing is None

    async def handle(msg: Message[T]) -> None:
        if idempotency is None:
            # What `async with msg.process()` does, without its two awaits per message.
            try:
                if plain:
                    await handler(msg)
                else:
                    await call(msg)
            except BaseException as exc:
                if not settle_outcome(msg, exc):
                    raise
            else:
                settle_outcome(msg, None)
        else:
            async with idempotency.process(msg) as fresh:
                if fresh:
                    await call(msg)

    async def worker() -> None:
        async for msg in consumer:
            await handle(msg)

    async def partition_worker(member: PartitionedConsumer[T]) -> None:
        # The member cancels a handler whose partition it gives up or loses.
        async for msg in member:
            with member.handling(msg):
                await handle(msg)

    with shield:
        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                name = f"aioredmq-worker-{consumer.label}-{i}"
                if isinstance(consumer, PartitionedConsumer):
                    tg.start_soon(partition_worker, consumer, name=name)
                else:
                    tg.start_soon(worker, name=name)
