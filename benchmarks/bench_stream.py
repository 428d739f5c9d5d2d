"""Publish and end-to-end rates of streams (one consumer group), beside raw redis-py in the same run.

    python -m benchmarks.bench_stream [--messages N] [--rounds R] [--body-bytes B] [--uvloop] [--json FILE]

The raw baseline is a reliable group consumer written here: XREADGROUP COUNT 256, then
one XACK for the batch. Every end-to-end round checks that each message was delivered
and that nothing is left pending.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import redis.asyncio as aioredis

import aioredmq

from .bench_queue import Case, cli, run_cases, runner_rate


def bench_cases(url: str, n: int, body: dict[str, Any]) -> dict[str, Case]:
    encoded = json.dumps(body).encode()

    async def raw_xadd_pipeline() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            t = time.perf_counter()
            for i in range(0, n, 1000):
                async with r.pipeline(transaction=False) as pipe:
                    for _ in range(min(1000, n - i)):
                        pipe.xadd("s", {"m": encoded})
                    await pipe.execute()
            return n / (time.perf_counter() - t)

    async def raw_group_e2e() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            for i in range(0, n, 1000):
                async with r.pipeline(transaction=False) as pipe:
                    for _ in range(min(1000, n - i)):
                        pipe.xadd("s", {"m": encoded})
                    await pipe.execute()
            await r.xgroup_create("s", "g", "0")
            done = 0
            t = time.perf_counter()
            while done < n:
                # The raw command: redis-py's typed xreadgroup() reply is a union mypy cannot narrow.
                reply: Any = await r.execute_command(  # type: ignore[no-untyped-call]
                    "XREADGROUP", "GROUP", "g", "c", "COUNT", 256, "BLOCK", 1000, "STREAMS", "s", ">"
                )
                entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
                for _, fields in entries:
                    json.loads(fields[b"m"])
                if entries:
                    await r.xack("s", "g", *[entry_id for entry_id, _ in entries])
                done += len(entries)
            rate = n / (time.perf_counter() - t)
            assert (await r.xpending("s", "g"))["pending"] == 0
            return rate

    async def mq_publish_many() -> float:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            s = mq.stream("bench")
            t = time.perf_counter()
            await s.publish_many(body for _ in range(n))
            return n / (time.perf_counter() - t)

    async def mq_runner_e2e(concurrency: int = 64, prefetch: int = 256) -> float:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            s = mq.stream("bench")
            await s.create_group("g", "begin")
            await s.publish_many(body for _ in range(n))
            rate = await runner_rate(mq, s, n, group="g", concurrency=concurrency, prefetch=prefetch)
            assert (await s.stats()).groups["g"].pending == 0
            return rate

    async def mq_async_for_e2e() -> float:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            s = mq.stream("bench")
            await s.create_group("g", "begin")
            await s.publish_many(body for _ in range(n))
            count = 0
            t = time.perf_counter()
            async with s.consume("g", prefetch=256) as consumer:
                async for msg in consumer:
                    await msg.ack()
                    count += 1
                    if count == n:
                        break
            rate = n / (time.perf_counter() - t)
            assert (await s.stats()).groups["g"].pending == 0
            return rate

    return {
        "raw: pipeline of 1000 XADD": raw_xadd_pipeline,
        "aioredmq: stream publish_many": mq_publish_many,
        "raw: group consume (XREADGROUP 256, XACK batch)": raw_group_e2e,
        "aioredmq: stream runner, concurrency 64, prefetch 256": mq_runner_e2e,
        "aioredmq: stream async for + ack, prefetch 256": mq_async_for_e2e,
    }


RATIOS = {
    "aioredmq: stream publish_many": "raw: pipeline of 1000 XADD",
    "aioredmq: stream runner, concurrency 64, prefetch 256": "raw: group consume (XREADGROUP 256, XACK batch)",
    "aioredmq: stream async for + ack, prefetch 256": "raw: group consume (XREADGROUP 256, XACK batch)",
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    return await run_cases(args, bench_cases, RATIOS)


if __name__ == "__main__":
    cli(__doc__, main)
