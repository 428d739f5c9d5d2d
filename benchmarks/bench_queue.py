"""Publish and end-to-end rates of the list queue, beside raw redis-py in the same run.

    python -m benchmarks.bench_queue [--messages N] [--rounds R] [--body-bytes B]
                                     [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

Starts its own redis-server on a free loopback port (or uses --redis-url; its data is
flushed), runs every case R times with the rounds interleaved, and prints the median
with min and max, and each aioredmq figure as a ratio of the raw redis-py case it is
compared to, measured in the same run.

Publish cases: ``publish_many``, 100 concurrent ``publish()`` calls of one message each
(where coalescing shows), and awaited ``publish()`` one at a time; raw redis-py does the
same with multi-value LPUSH, a pipeline of single LPUSH, 100 concurrent LPUSH and
awaited LPUSH. End-to-end cases consume a pre-filled queue (publish time not counted):
the runner and ``async for`` + ack over a prefetch/concurrency sweep, against a raw
reliable consumer written here (a Lua script moves 256 to a processing list, a pipeline
of LREM acks them). Every handler reads the decoded body, as the raw one runs json.loads.
Every round checks that each message was delivered and acked and the queue is empty.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

import aioredmq

from .common import (
    Bench,
    aioredmq_e2e_cases,
    concurrent_publish_case,
    fill,
    length,
    main,
    make_bench,
    publish_many_case,
    raw_concurrent_case,
)

# The raw reliable consumer: move a batch into a processing list in one Lua call, ack by LREM.
RAW_TAKE = """
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then return {} end
redis.call('LPUSH', KEYS[2], unpack(items))
return items
"""


def publish_cases(bench: Bench, url: str, n: int, body: dict[str, Any]) -> None:
    encoded = json.dumps(body).encode()
    single = max(1, n // 20)  # one round trip each: fewer, or the run takes minutes

    async def raw_lpush_multi() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            t = time.perf_counter()
            for i in range(0, n, 1000):
                await r.lpush("raw", *[encoded] * min(1000, n - i))
            rate = n / (time.perf_counter() - t)
            assert await r.llen("raw") == n
            return rate

    async def raw_lpush_pipeline() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            t = time.perf_counter()
            for i in range(0, n, 100):
                async with r.pipeline(transaction=False) as pipe:
                    for _ in range(min(100, n - i)):
                        pipe.lpush("raw", encoded)
                    await pipe.execute()
            rate = n / (time.perf_counter() - t)
            assert await r.llen("raw") == n
            return rate

    async def raw_awaited_single() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            t = time.perf_counter()
            for _ in range(single):
                await r.lpush("raw", json.dumps(body).encode())
            return single / (time.perf_counter() - t)

    async def mq_awaited_single() -> float:
        async with aioredmq.connect(url) as mq:
            q = await fill(mq, "queue", 0, body)
            t = time.perf_counter()
            for _ in range(single):
                await q.publish(body)
            rate = single / (time.perf_counter() - t)
            assert await length(q) == single
            return rate

    multi, pipe = "raw: LPUSH, 1000 values per command", "raw: pipeline of 100 single LPUSH"
    conc, awaited = "raw: 100 concurrent single LPUSH", "raw: awaited LPUSH one by one"
    bench.case(multi, "publish", raw_lpush_multi)
    bench.case(pipe, "publish", raw_lpush_pipeline)
    lpush = raw_concurrent_case(url, n, lambda r: r.lpush("raw", json.dumps(body).encode()), lambda r: r.llen("raw"))
    bench.case(conc, "publish", lpush)
    bench.case(awaited, "publish", raw_awaited_single)
    bench.case("aioredmq: publish_many", "publish", publish_many_case(url, "queue", n, body), baseline=multi)
    concurrent = concurrent_publish_case(url, "queue", n, body)
    bench.case("aioredmq: 100 concurrent publish()", "publish", concurrent, baseline=conc)
    bench.case("aioredmq: awaited publish() one by one", "publish", mq_awaited_single, baseline=awaited)


def e2e_cases(bench: Bench, url: str, n: int, body: dict[str, Any]) -> None:
    encoded = json.dumps(body).encode()

    async def raw_reliable_e2e() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
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

    raw = "raw: reliable consume (Lua move 256, LREM ack)"
    bench.case(raw, "e2e", raw_reliable_e2e)
    aioredmq_e2e_cases(bench, url, "queue", n, body, raw)


make = make_bench("queue", publish_cases, e2e_cases)

if __name__ == "__main__":
    main("queue", __doc__, make)
