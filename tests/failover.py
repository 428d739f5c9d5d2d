"""A run that a failover interrupts: steady publishes and a runner, then ``kill()``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import aioredmq

from .helpers import wait_for


@dataclass
class FailoverRun:
    confirmed: set[int] = field(default_factory=set)
    handled: dict[int, float] = field(default_factory=dict)
    resumed_s: float = 0.0

    @property
    def lost(self) -> set[int]:
        return self.confirmed - set(self.handled)


async def run_through(
    mq: aioredmq.Client,
    source: aioredmq.Queue[Any] | aioredmq.Stream[Any] | aioredmq.PartitionedQueue[Any],
    kill: Callable[[], None],
    replicas: Callable[[int], int],
    *,
    group: str | None = None,
    watched: Callable[[int], bool] = lambda n: True,
) -> FailoverRun:
    """Publish one message every 10 ms (each its own task, so one waiting out a retry
    does not hold back the next; message n asks for ``replicas(n)``; a partitioned
    queue's keys take turns), handle them (a stream: as ``group``), call ``kill()`` after
    100 were handled, and measure how long until a message sent after the kill is
    handled (one that ``watched(n)`` picks: one that the killed server must carry)."""
    run = FailoverRun()
    sent = 0
    stop = anyio.Event()

    async def publish_one(n: int) -> None:
        try:
            if isinstance(source, aioredmq.PartitionedQueue):
                await source.publish({"n": n}, key=f"k{n % 8}", replicas=replicas(n))
            else:
                await source.publish({"n": n}, replicas=replicas(n))
            run.confirmed.add(n)
        except aioredmq.AioredmqError:
            pass  # unconfirmed or not replicated: it may or may not survive

    async def produce() -> None:
        nonlocal sent
        async with anyio.create_task_group() as publishes:
            while not stop.is_set():
                publishes.start_soon(publish_one, sent)
                sent += 1
                await anyio.sleep(0.01)

    async def handler(msg: aioredmq.Message[Any]) -> None:
        run.handled.setdefault(msg.body["n"], time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(source, handler, concurrency=4, group=group))
        tg.start_soon(produce)
        await wait_for(lambda: len(run.handled) >= 100, 10, "traffic before the kill")
        kill()
        killed_at, first_after = time.monotonic(), sent
        await wait_for(
            lambda: any(n >= first_after and watched(n) for n in run.handled),
            20,
            "work on a message sent after the kill",
        )
        run.resumed_s = min(t for n, t in run.handled.items() if n >= first_after and watched(n)) - killed_at
        stop.set()
        await anyio.sleep(1.0)  # what was sent before the stop is handled
        tg.cancel_scope.cancel()
    return run
