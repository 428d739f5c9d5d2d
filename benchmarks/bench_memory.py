"""Memory of a consumer draining a large backlog: its RSS must stay low and flat.

    python -m benchmarks.bench_memory [--messages N] [--rounds R] [--body-bytes B]
                                      [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

Each round, a separate process fills the queue with N messages (default 1,000,000), so
this process's memory is the consumer's alone. The runner (concurrency 64, prefetch
1024) then drains it while RSS is sampled every 1% of the backlog. Figures, in MB: RSS
when the drain starts, peak RSS during it, and the growth from 10% of the way to the
end (flat means about 0: nothing accumulates per message). Also the drain rate. Each
round checks that every message was handled and the queue is empty.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import anyio

import aioredmq

from .common import Bench, Case, CaseResult, body_of, main, rss_mb

FILL = """
import asyncio, json, sys, aioredmq
async def fill(url, n, body):
    async with aioredmq.connect(url) as mq:
        q = mq.queue("bench-memory")
        for i in range(0, n, 100_000):
            await q.publish_many(body for _ in range(i, min(n, i + 100_000)))
asyncio.run(fill(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))
"""


def drain_case(url: str, n: int, body: dict[str, Any]) -> Case:
    async def case() -> dict[str, float]:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            await anyio.run_process([sys.executable, "-c", FILL, url, str(n), json.dumps(body)], stdout=None)
            q = mq.queue("bench-memory")
            assert (await q.stats()).ready == n
            seen = 0
            samples: list[float] = []
            step = max(1, n // 100)
            done = anyio.Event()

            async def handler(msg: aioredmq.Message[Any]) -> None:
                nonlocal seen
                seen += 1
                if seen % step == 0:
                    samples.append(rss_mb())
                if seen == n:
                    done.set()

            start = rss_mb()
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(q, handler, concurrency=64, prefetch=1024))
                await done.wait()
                tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - t
            stats = await q.stats()
            assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
        tenth = samples[len(samples) // 10]
        return {
            "RSS at start (MB)": start,
            "peak RSS (MB)": max([*samples, start]),
            "growth from 10% to the end (MB)": samples[-1] - tenth,
            "drain rate (msg/s)": n / elapsed,
        }

    return case


async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
    bench = Bench("memory", args)
    name = f"aioredmq: runner draining a backlog of {args.messages:,}"
    bench.case(name, "memory", drain_case(url, args.messages, body_of(args.body_bytes)), unit="")
    return await bench.run()


if __name__ == "__main__":
    main("memory", __doc__, make, messages=1_000_000)
