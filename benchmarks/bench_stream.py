"""Publish and end-to-end rates of streams (one consumer group), beside raw redis-py in the same run.

    python -m benchmarks.bench_stream [--messages N] [--rounds R] [--body-bytes B]
                                      [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

Publish cases: ``publish_many`` and 100 concurrent ``publish()`` against a raw pipeline
of 1000 XADD and 100 concurrent XADD. End-to-end cases consume a pre-filled stream: the
runner over a prefetch/concurrency sweep and ``async for`` + ack, against a raw reliable
group consumer written here (XREADGROUP COUNT 256, json.loads each, one XACK per batch).
Every round checks that each message was delivered and nothing is left pending.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from .common import (
    Bench,
    aioredmq_e2e_cases,
    concurrent_publish_case,
    main,
    make_bench,
    publish_many_case,
    raw_concurrent_case,
)


def publish_cases(bench: Bench, url: str, n: int, body: dict[str, Any]) -> None:
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
            rate = n / (time.perf_counter() - t)
            assert await r.xlen("s") == n
            return rate

    pipe, conc = "raw: pipeline of 1000 XADD", "raw: 100 concurrent single XADD"
    bench.case(pipe, "publish", raw_xadd_pipeline)
    xadd = raw_concurrent_case(url, n, lambda r: r.xadd("s", {"m": json.dumps(body).encode()}), lambda r: r.xlen("s"))
    bench.case(conc, "publish", xadd)
    bench.case("aioredmq: stream publish_many", "publish", publish_many_case(url, "stream", n, body), baseline=pipe)
    concurrent = concurrent_publish_case(url, "stream", n, body)
    bench.case("aioredmq: stream, 100 concurrent publish()", "publish", concurrent, baseline=conc)


def e2e_cases(bench: Bench, url: str, n: int, body: dict[str, Any]) -> None:
    encoded = json.dumps(body).encode()

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

    raw = "raw: group consume (XREADGROUP 256, XACK batch)"
    bench.case(raw, "e2e", raw_group_e2e)
    aioredmq_e2e_cases(bench, url, "stream", n, body, raw)


make = make_bench("stream", publish_cases, e2e_cases)

if __name__ == "__main__":
    main("stream", __doc__, make)
