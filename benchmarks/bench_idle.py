"""What an idle consumer costs Redis: commands per second, from INFO commandstats.

    python -m benchmarks.bench_idle [--consumers K] [--seconds S] [--rounds R]
                                    [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

Opens K idle consumers (default 4) of an empty list queue, of an empty stream's group,
and of an empty partitioned queue (4 partitions), each with the defaults a user gets,
lets them settle for 1 s, then counts the commands Redis runs over S seconds (default
20). Two figures per case, per consumer per second: every command Redis counts
(commands run inside scripts included), and the calls clients send (EVALSHA counted
once). Nothing else talks to the server meanwhile: the counting client's own INFO calls
are left out.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis

import aioredmq

from .common import Bench, Case, CaseResult, main, options

_OWN = {"info", "config|resetstat", "client|setinfo", "hello"}
"""What the counting client runs itself, or what any connection runs once on connect."""


async def _counts(r: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def idle_case(url: str, kind: str, consumers: int, seconds: float) -> Case:
    async def case() -> dict[str, float]:
        async with aioredis.Redis.from_url(url) as r, aioredmq.connect(url) as mq:
            await r.flushall()
            async with contextlib.AsyncExitStack() as stack:
                for i in range(consumers):
                    await stack.enter_async_context(_consumer(mq, kind, i))
                await anyio.sleep(1.0)
                await r.config_resetstat()
                before = await _counts(r)
                await anyio.sleep(seconds)
                after = await _counts(r)
        delta = {k: v - before.get(k, 0) for k, v in after.items() if k not in _OWN}
        total = sum(delta.values())
        scripted = {"evalsha", "eval", "script|load"}
        inside = sum(v for k, v in delta.items() if k not in scripted) - _sent_directly(delta)
        sent = total - inside
        per = consumers * seconds
        return {"all commands per consumer per second": total / per, "client calls per consumer per second": sent / per}

    return case


def _sent_directly(delta: dict[str, int]) -> int:
    """Commands clients send themselves (not inside a script): the blocking reads."""
    return sum(delta.get(k, 0) for k in ("blmove", "brpoplpush", "xreadgroup", "ping", "psubscribe"))


@contextlib.asynccontextmanager
async def _consumer(mq: aioredmq.Client, kind: str, i: int) -> AsyncIterator[None]:
    if kind == "queue":
        async with mq.queue("idle").consume():
            yield
    elif kind == "stream":
        async with mq.stream("idle").consume("g"):
            yield
    else:
        async with mq.partitioned("idle-p", partitions=4).consume():
            yield


async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
    bench = Bench("idle", args)
    for kind, label in (
        ("queue", "list queue"),
        ("stream", "stream group"),
        ("partitioned", "partitioned queue (4 partitions)"),
    ):
        name = f"aioredmq: idle {label} consumer"
        bench.case(name, "idle", idle_case(url, kind, args.consumers, args.seconds), unit="commands/s")
    return await bench.run()


if __name__ == "__main__":
    parser = options(__doc__)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    main("idle", __doc__, make, parser=parser)
