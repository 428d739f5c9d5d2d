"""Publish and end-to-end rates of the list queue, beside raw redis-py in the same run.

    python -m benchmarks.bench_queue [--messages N] [--rounds R] [--body-bytes B] [--uvloop] [--json FILE]

Starts its own redis-server on a free loopback port (or uses --redis-url), runs every
case R times, and prints the median with min and max, and each aioredmq figure as a
ratio of the raw redis-py baseline measured in the same run. Every end-to-end round
checks that each message was delivered and acked, and that the queue is empty after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypedDict

import anyio
import redis
import redis.asyncio as aioredis

import aioredmq
from aioredmq.testing import RedisServer

Case = Callable[[], Awaitable[float]]


class CaseSummary(TypedDict):
    """One case's rates over all rounds, in messages per second."""

    median: float
    min: float
    max: float
    runs: list[float]


# The raw reliable consumer: move a batch into a processing list in one Lua call, ack by LREM.
RAW_TAKE = """
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then return {} end
redis.call('LPUSH', KEYS[2], unpack(items))
return items
"""


async def _flush(r: aioredis.Redis) -> None:
    await r.flushall()


async def runner_rate(
    mq: aioredmq.Client,
    source: aioredmq.Queue[Any] | aioredmq.Stream[Any],
    n: int,
    *,
    group: str | None = None,
    concurrency: int,
    prefetch: int,
) -> float:
    """Run ``mq.run`` with a no-op handler until ``n`` distinct messages were handled; the rate."""
    seen: set[str] = set()
    done = anyio.Event()

    async def handler(msg: aioredmq.Message[Any]) -> None:
        seen.add(msg.id)
        if len(seen) == n:
            done.set()

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        run = functools.partial(mq.run, source, handler, group=group, concurrency=concurrency, prefetch=prefetch)
        tg.start_soon(run)
        await done.wait()
        tg.cancel_scope.cancel()
    rate = n / (time.perf_counter() - t)
    assert len(seen) == n, "every message delivered"
    return rate


def bench_cases(url: str, n: int, body: dict[str, Any]) -> dict[str, Case]:
    encoded = json.dumps(body).encode()

    async def raw_lpush_multi() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await _flush(r)
            t = time.perf_counter()
            for i in range(0, n, 1000):
                await r.lpush("raw", *[encoded] * min(1000, n - i))
            rate = n / (time.perf_counter() - t)
            assert await r.llen("raw") == n
            return rate

    async def raw_lpush_pipeline() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await _flush(r)
            t = time.perf_counter()
            for i in range(0, n, 100):
                async with r.pipeline(transaction=False) as pipe:
                    for _ in range(min(100, n - i)):
                        pipe.lpush("raw", encoded)
                    await pipe.execute()
            rate = n / (time.perf_counter() - t)
            assert await r.llen("raw") == n
            return rate

    async def raw_concurrent_single() -> float:
        async with aioredis.Redis.from_url(url, max_connections=100) as r:
            await _flush(r)
            t = time.perf_counter()
            for _ in range(n // 100):
                await asyncio.gather(*(r.lpush("raw", encoded) for _ in range(100)))
            rate = n // 100 * 100 / (time.perf_counter() - t)
            return rate

    async def mq_publish_many() -> float:
        async with aioredmq.connect(url) as mq:
            await _flush(mq.redis)
            q = mq.queue("bench")
            t = time.perf_counter()
            await q.publish_many(body for _ in range(n))
            rate = n / (time.perf_counter() - t)
            assert (await q.stats()).ready == n
            return rate

    async def mq_concurrent_single() -> float:
        async with aioredmq.connect(url) as mq:
            await _flush(mq.redis)
            q = mq.queue("bench")
            t = time.perf_counter()
            for _ in range(n // 100):
                await asyncio.gather(*(q.publish(body) for _ in range(100)))
            rate = n // 100 * 100 / (time.perf_counter() - t)
            assert (await q.stats()).ready == n // 100 * 100
            return rate

    async def mq_awaited_single() -> float:
        m = max(1, n // 20)
        async with aioredmq.connect(url) as mq:
            await _flush(mq.redis)
            q = mq.queue("bench")
            t = time.perf_counter()
            for _ in range(m):
                await q.publish(body)
            return m / (time.perf_counter() - t)

    async def raw_reliable_e2e() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await _flush(r)
            for i in range(0, n, 1000):
                await r.lpush("ready", *[encoded] * min(1000, n - i))
            take = r.register_script(RAW_TAKE)
            done = 0
            t = time.perf_counter()
            while done < n:
                items = await take(keys=["ready", "processing"], args=[256])
                async with r.pipeline(transaction=False) as pipe:
                    for item in items:
                        json.loads(item)
                        pipe.lrem("processing", -1, item)
                    await pipe.execute()
                done += len(items)
            rate = n / (time.perf_counter() - t)
            assert await r.llen("processing") == 0
            return rate

    async def mq_runner_e2e(concurrency: int = 64, prefetch: int = 256) -> float:
        async with aioredmq.connect(url) as mq:
            await _flush(mq.redis)
            q = mq.queue("bench")
            await q.publish_many(body for _ in range(n))
            rate = await runner_rate(mq, q, n, concurrency=concurrency, prefetch=prefetch)
            stats = await q.stats()
            assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
            return rate

    async def mq_async_for_e2e() -> float:
        async with aioredmq.connect(url) as mq:
            await _flush(mq.redis)
            q = mq.queue("bench")
            await q.publish_many(body for _ in range(n))
            count = 0
            t = time.perf_counter()
            async with q.consume(prefetch=256) as consumer:
                async for msg in consumer:
                    await msg.ack()
                    count += 1
                    if count == n:
                        break
            rate = n / (time.perf_counter() - t)
            stats = await q.stats()
            assert (stats.ready, stats.in_flight) == (0, 0), stats
            return rate

    return {
        "raw: LPUSH, 1000 values per command": raw_lpush_multi,
        "raw: pipeline of 100 single LPUSH": raw_lpush_pipeline,
        "raw: 100 concurrent single LPUSH": raw_concurrent_single,
        "aioredmq: publish_many": mq_publish_many,
        "aioredmq: 100 concurrent publish()": mq_concurrent_single,
        "aioredmq: awaited publish() one by one": mq_awaited_single,
        "raw: reliable consume (Lua move 256, LREM ack)": raw_reliable_e2e,
        "aioredmq: runner, concurrency 64, prefetch 256": mq_runner_e2e,
        "aioredmq: async for + ack, prefetch 256": mq_async_for_e2e,
    }


RATIOS = {
    "aioredmq: publish_many": "raw: LPUSH, 1000 values per command",
    "aioredmq: 100 concurrent publish()": "raw: 100 concurrent single LPUSH",
    "aioredmq: runner, concurrency 64, prefetch 256": "raw: reliable consume (Lua move 256, LREM ack)",
    "aioredmq: async for + ack, prefetch 256": "raw: reliable consume (Lua move 256, LREM ack)",
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    return await run_cases(args, bench_cases, RATIOS)


async def run_cases(
    args: argparse.Namespace,
    make_cases: Callable[[str, int, dict[str, Any]], dict[str, Case]],
    ratios: dict[str, str],
) -> dict[str, Any]:
    """Run every case ``args.rounds`` times, print a Markdown table with medians and ratios."""
    body = {"id": 1, "pad": "x" * max(0, args.body_bytes - 20)}
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        cases = make_cases(url, args.messages, body)
        results: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, case in cases.items():
                results[name].append(await case())
                print(f"  round {r + 1}/{args.rounds}  {name:<50} {results[name][-1]:>12,.0f} msg/s", file=sys.stderr)
        server = redis.Redis.from_url(url).info("server")["redis_version"]
    summary: dict[str, CaseSummary] = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for name, v in results.items()
    }
    print(f"\n{args.messages:,} messages of ~{len(json.dumps(body))} B, {args.rounds} rounds, "
          f"{'uvloop' if args.uvloop else 'asyncio'}, Python {platform.python_version()}, "
          f"redis-py {redis.__version__}, Redis {server}\n")  # fmt: skip
    print("| case | median msg/s | min | max | vs raw |\n|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        base = ratios.get(name)
        ratio = f"{s['median'] / summary[base]['median']:.2f}x" if base else ""
        print(f"| {name} | {s['median']:,.0f} | {s['min']:,.0f} | {s['max']:,.0f} | {ratio} |")
    return {
        "messages": args.messages,
        "body_bytes": len(json.dumps(body)),
        "loop": "uvloop" if args.uvloop else "asyncio",
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": server,
        "results": summary,
    }


def cli(description: str | None, run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """Parse the shared options, install uvloop if asked, run, and write the JSON results."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--redis-url")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--json", help="write the results here")
    ns = parser.parse_args()
    if ns.uvloop:
        import uvloop

        uvloop.install()
    out: dict[str, Any] = asyncio.run(run(ns))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    cli(__doc__, main)
