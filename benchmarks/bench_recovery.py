"""Recovery: from SIGKILL of a consumer until its messages are being processed again.

    python -m benchmarks.bench_recovery [--lease-s L] [--messages N] [--rounds R]
                                        [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

A worker process (``python -m aioredmq worker``, concurrency 8, prefetch 32) takes
messages from a list queue, or from a stream's group, with a handler that never
finishes, so it holds 32 of N (default 200). Once Redis shows it holding them, it is
killed with SIGKILL, and a surviving consumer in this process (already running,
concurrency 64, the same lease) goes on with the rest. Measured from the kill:

* **first**: until the first of the dead worker's messages starts in a live handler;
* **all**: until every one of them has.

Both are bounded by the lease (``--lease-s``, default 2 s; the library's default is
30 s): a consumer is dead to the others only once its lease has expired, and a live
one looks for expired leases every lease/3. Each round checks that every message was
handled, the killed worker's ones exactly once more, and nothing is left.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import anyio

import aioredmq

from .common import Bench, Case, CaseResult, main, options

PREFETCH = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def hold(msg: aioredmq.Message[Any]) -> None:
    """The doomed worker's handler: holds its message until the process is killed."""
    await anyio.sleep_forever()


def recovery_case(url: str, kind: str, n: int, lease_s: float) -> Case:
    async def case() -> dict[str, float]:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            source: aioredmq.Queue[Any] | aioredmq.Stream[Any]
            if kind == "queue":
                source = mq.queue("recovery", lease_s=lease_s)
                where = ["--queue", "recovery"]
            else:
                source = mq.stream("recovery", lease_s=lease_s)
                await source.create_group("g", "begin")
                where = ["--stream", "recovery", "--group", "g"]
            await source.publish_many({"n": i} for i in range(n))
            worker = await anyio.open_process(
                [sys.executable, "-m", "aioredmq", "worker", "benchmarks.bench_recovery:hold", *where,
                 "--url", url, "--lease-s", str(lease_s), "--concurrency", "8", "--prefetch", str(PREFETCH)],
                cwd=ROOT, stdout=None, stderr=None,
            )  # fmt: skip
            async with worker:
                try:
                    with anyio.fail_after(30):
                        while await _held(source) < PREFETCH:  # noqa: ASYNC110 - polling Redis, not a local flag
                            await anyio.sleep(0.01)
                except BaseException:
                    worker.kill()
                    raise
                # Start the survivor: it takes what the worker does not hold.
                handled: dict[int, float] = {}
                deliveries: dict[int, int] = {}
                rest, every = anyio.Event(), anyio.Event()

                async def handler(msg: aioredmq.Message[Any]) -> None:
                    handled.setdefault(msg.body["n"], time.monotonic())
                    deliveries[msg.body["n"]] = msg.deliveries
                    if len(handled) >= n - PREFETCH:
                        rest.set()
                    if len(handled) == n:
                        every.set()

                async with anyio.create_task_group() as tg:
                    group = "g" if kind == "stream" else None
                    tg.start_soon(lambda: mq.run(source, handler, group=group, concurrency=64))
                    with anyio.fail_after(30):
                        await rest.wait()
                    killed = time.monotonic()
                    worker.send_signal(signal.SIGKILL)
                    await worker.wait()
                    with anyio.fail_after(lease_s * 5 + 10):
                        await every.wait()
                    tg.cancel_scope.cancel()
        redelivered = [k for k, d in deliveries.items() if d == 2]
        assert sorted(handled) == list(range(n)), "every message handled"
        assert len(redelivered) == PREFETCH, f"the killed worker's {PREFETCH} came back once: {len(redelivered)}"
        times = sorted(handled[k] - killed for k in redelivered)
        return {"first": times[0], "all": times[-1]}

    return case


async def _held(source: aioredmq.Queue[Any] | aioredmq.Stream[Any]) -> int:
    if isinstance(source, aioredmq.Queue):
        return (await source.stats()).in_flight
    return (await source.stats()).groups["g"].pending


async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
    bench = Bench("recovery", args)
    for kind in ("queue", "stream"):
        name = f"aioredmq: {kind}, lease {args.lease_s:g} s, SIGKILL to processing again"
        bench.case(name, "recovery", recovery_case(url, kind, args.messages, args.lease_s), unit="s")
    return await bench.run()


if __name__ == "__main__":
    parser = options(__doc__, messages=200)
    parser.add_argument("--lease-s", type=float, default=2.0)
    main("recovery", __doc__, make, parser=parser)
