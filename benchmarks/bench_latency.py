"""Latency from publish to handler start, at fixed rates, beside raw redis-py in the same run.

    python -m benchmarks.bench_latency [--rates 1000,2000,10000] [--seconds S] [--rounds R]
                                       [--body-bytes B] [--loop asyncio|uvloop] [--json FILE]

One process, as a service that publishes and consumes would be. A pacer releases the
messages due on a 1 ms tick at a fixed rate; the body carries the time it was sent.
Each handler start records its latency: now minus that time, on the same monotonic
clock. Cases per rate:

* raw redis-py: the tick's messages as one pipeline of LPUSH, one BRPOP loop consuming
  (unreliable: no ack, a crash loses what was popped);
* aioredmq list queue: one ``publish()`` call per message, concurrently (they coalesce),
  and the runner (concurrency 16), acks included;
* aioredmq stream: the runner on one group (concurrency 16), acks included.

Each run lasts S seconds after a 0.5 s warm-up (not counted) and checks that every
message was handled once. Figures: p50, p99, p99.9 and max, in ms; each the median of R
runs, with min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis

import aioredmq

from .common import Bench, Case, CaseResult, body_of, main, options

WARMUP_S = 0.5


def _figures(latencies_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies_s)
    q = statistics.quantiles(ms, n=1000, method="inclusive")
    return {"p50": statistics.median(ms), "p99": q[989], "p99.9": q[998], "max": ms[-1]}


class _Seen:
    """Latency by message number; ``all`` is set once ``total`` were handled."""

    def __init__(self, rate: int, seconds: float) -> None:
        self.rate = rate
        self.total = int(rate * (seconds + WARMUP_S))
        self.latency: dict[int, float] = {}
        self.all = anyio.Event()

    def handled(self, n: int, sent_at: float) -> None:
        self.latency[n] = time.monotonic() - sent_at
        if len(self.latency) == self.total:
            self.all.set()

    async def pace(self, send: Callable[[list[dict[str, Any]]], Awaitable[object]], body: Any) -> None:
        """Send ``rate`` messages a second: on each 1 ms tick, those due, by one ``send``
        call in a task of its own; then wait until all were handled."""
        start = time.monotonic()
        sent = 0

        async def tick(msgs: list[dict[str, Any]]) -> None:
            await send(msgs)

        async with anyio.create_task_group() as tg:
            while sent < self.total:
                due = min(int((time.monotonic() - start) * self.rate) + 1, self.total)
                now = time.monotonic()
                tg.start_soon(tick, [{**body, "t": now, "n": n} for n in range(sent, due)])
                sent = due
                await anyio.sleep(0.001)
        with anyio.fail_after(30):
            await self.all.wait()

    def figures(self) -> dict[str, float]:
        skip = int(self.rate * WARMUP_S)
        return _figures([lat for n, lat in self.latency.items() if n >= skip])


def raw_case(url: str, rate: int, seconds: float, body: dict[str, Any]) -> Case:
    async def case() -> dict[str, float]:
        seen = _Seen(rate, seconds)
        async with aioredis.Redis.from_url(url) as r, aioredis.Redis.from_url(url) as c:
            await r.flushall()

            async def consume() -> None:
                while True:
                    reply = await c.brpop(["raw-latency"], timeout=1)
                    if reply is not None:
                        msg = json.loads(reply[1])
                        seen.handled(msg["n"], msg["t"])

            async def send(msgs: list[dict[str, Any]]) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for msg in msgs:
                        pipe.lpush("raw-latency", json.dumps(msg).encode())
                    await pipe.execute()

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await seen.pace(send, body)
                tg.cancel_scope.cancel()
        return seen.figures()

    return case


def mq_case(url: str, kind: str, rate: int, seconds: float, body: dict[str, Any]) -> Case:
    async def case() -> dict[str, float]:
        seen = _Seen(rate, seconds)
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            source: aioredmq.Queue[Any] | aioredmq.Stream[Any]
            if kind == "queue":
                source = mq.queue("latency")
            else:
                source = mq.stream("latency")
                await source.create_group("default", "begin")

            async def handler(msg: aioredmq.Message[Any]) -> None:
                seen.handled(msg.body["n"], msg.body["t"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(source, handler, concurrency=16))
                await anyio.sleep(0.2)  # the consumer is open and waiting

                async def send(msgs: list[dict[str, Any]]) -> None:
                    async with anyio.create_task_group() as publishes:
                        for msg in msgs:
                            publishes.start_soon(source.publish, msg)

                await seen.pace(send, body)
                tg.cancel_scope.cancel()
        return seen.figures()

    return case


async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
    bench = Bench("latency", args)
    body = body_of(args.body_bytes)
    for rate in (int(r) for r in args.rates.split(",")):
        raw = f"raw: LPUSH + BRPOP at {rate:,} msg/s"
        bench.case(raw, "latency", raw_case(url, rate, args.seconds, body), unit="ms")
        for kind in ("queue", "stream"):
            name = f"aioredmq: {kind}, runner, at {rate:,} msg/s"
            bench.case(name, "latency", mq_case(url, kind, rate, args.seconds, body), unit="ms", baseline=raw)
    return await bench.run()


if __name__ == "__main__":
    parser = options(__doc__)
    parser.add_argument("--rates", default="1000,2000,10000", help="messages per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run (default 3)")
    main("latency", __doc__, make, parser=parser)
