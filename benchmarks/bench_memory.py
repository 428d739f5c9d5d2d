"""Memory of a consumer draining a large backlog: its RSS must stay flat.

    python -m benchmarks.bench_memory [--messages N] [--redis-url URL]

A separate process fills the queue first, so this process's memory is the consumer's
alone. The runner (concurrency 64, prefetch 256) then drains it; RSS is sampled ten
times along the way. Checks that every message was handled and the queue is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import subprocess
import sys
import time
from typing import Any

import anyio

import aioredmq
from aioredmq.testing import RedisServer

FILL = """
import asyncio, sys, aioredmq
async def fill(url, n):
    async with aioredmq.connect(url) as mq:
        q = mq.queue("bench-memory")
        for i in range(0, n, 100_000):
            await q.publish_many({"n": j, "pad": "x" * 80} for j in range(i, min(n, i + 100_000)))
asyncio.run(fill(sys.argv[1], int(sys.argv[2])))
"""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


async def main(n: int, url: str) -> None:
    async with aioredmq.connect(url) as mq:
        q = mq.queue("bench-memory")
        backlog = (await q.stats()).ready
        assert backlog == n, backlog
        start = rss_mb()
        seen = 0
        samples: list[float] = []
        done = anyio.Event()

        async def handler(msg: aioredmq.Message[Any]) -> None:
            nonlocal seen
            seen += 1
            if seen % max(1, n // 10) == 0:
                samples.append(round(rss_mb(), 1))
            if seen == n:
                done.set()

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(mq.run, q, handler, concurrency=64, prefetch=256))
            await done.wait()
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - t
        stats = await q.stats()
        assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
    print(f"backlog {n:,}: drained in {elapsed:.1f} s ({n / elapsed:,.0f} msg/s)")
    print(f"RSS at start {start:.1f} MB; every {n // 10:,} messages: {samples} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(RedisServer()).url
        subprocess.run([sys.executable, "-c", FILL, redis_url, str(args.messages)], check=True)
        asyncio.run(main(args.messages, redis_url))
