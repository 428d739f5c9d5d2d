"""What every benchmark script shares: options, a throwaway server, rounds, medians, JSON.

Every script writes the same JSON shape, which ``benchmarks.run_all`` turns into the
README's tables and plot::

    {"benchmark": "queue", "env": {...}, "params": {...},
     "cases": [{"name": ..., "group": ..., "unit": "msg/s", "median": ..., "min": ...,
                "max": ..., "runs": [...], "baseline": <name of a raw case> | null}]}

``baseline`` names the raw redis-py case of the same run that a figure is compared to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict

import anyio
import redis
import redis.asyncio as aioredis

import aioredmq
from aioredmq.testing import RedisServer

Case = Callable[[], Awaitable[float | dict[str, float]]]
"""One run of a case: a figure, or several named ones (``{"p50": ..., "p99": ...}``)."""


class CaseResult(TypedDict):
    """One case over all rounds."""

    name: str
    group: str
    unit: str
    median: float
    min: float
    max: float
    runs: list[float]
    baseline: str | None


@dataclass
class Bench:
    """The cases of one script, in the order they run, and their results."""

    name: str
    args: argparse.Namespace
    cases: dict[str, tuple[str, str, Case, str | None]] = field(default_factory=dict)

    def case(self, name: str, group: str, fn: Case, *, unit: str = "msg/s", baseline: str | None = None) -> None:
        """Register a case. A case returning several figures becomes one result per
        figure, named ``"<name>: <figure>"``; its baseline then names a case of the same
        figures, and each is compared to the same figure of it."""
        self.cases[name] = (group, unit, fn, baseline)

    async def run(self) -> list[CaseResult]:
        """Every case once per round, rounds interleaved: noise hits all cases alike."""
        runs: dict[str, list[float]] = {}
        meta: dict[str, tuple[str, str, str | None]] = {}
        for r in range(self.args.rounds):
            for name, (group, unit, fn, baseline) in self.cases.items():
                value = await fn()
                figures = value if isinstance(value, dict) else {"": value}
                for figure, v in figures.items():
                    key = f"{name}: {figure}" if figure else name
                    base = (f"{baseline}: {figure}" if figure else baseline) if baseline else None
                    runs.setdefault(key, []).append(v)
                    meta[key] = (group, unit, base)
                    print(f"  round {r + 1}/{self.args.rounds}  {key:<64} {v:>12,.2f} {unit}", file=sys.stderr)
        return [
            {
                "name": key,
                "group": group,
                "unit": unit,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "runs": values,
                "baseline": base,
            }
            for key, values in runs.items()
            for group, unit, base in [meta[key]]
        ]


def body_of(size: int) -> dict[str, Any]:
    """A JSON body that encodes to ``size`` bytes (at least 20)."""
    return {"id": 1, "pad": "x" * max(0, size - 20)}


def options(description: str | None, *, messages: int = 100_000) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--body-bytes", type=int, default=100)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--redis-url", help="use this server (its data is flushed) instead of starting one")
    parser.add_argument("--json", help="write the results here")
    return parser


def environment(url: str, loop: str) -> dict[str, Any]:
    info = redis.Redis.from_url(url).info("server")
    return {
        "python": platform.python_version(),
        "loop": loop,
        "redis_py": redis.__version__,
        "redis_server": info["redis_version"],
        "aioredmq": aioredmq.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
    }


@contextlib.contextmanager
def server(url: str | None, *args: str) -> Iterator[str]:
    """The given server's URL, or a throwaway server's."""
    if url:
        yield url
        return
    with RedisServer(*args) as s:
        yield s.url


def main(
    name: str,
    description: str | None,
    make: Callable[[argparse.Namespace, str], Coroutine[Any, Any, list[CaseResult]]],
    *,
    messages: int = 100_000,
    parser: argparse.ArgumentParser | None = None,
) -> None:
    """Parse the options, start a server, run ``make(args, url)`` on the chosen event
    loop, print a Markdown table and write the JSON."""
    args = (parser or options(description, messages=messages)).parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    with server(args.redis_url) as url:
        t = time.perf_counter()
        cases = asyncio.run(make(args, url))
        env = environment(url, args.loop)
    finish(name, args, env, cases, time.perf_counter() - t)


def finish(name: str, args: argparse.Namespace, env: dict[str, Any], cases: list[CaseResult], took: float) -> None:
    """Print the Markdown table, and write the JSON if ``--json`` asked for it."""
    params = {k: v for k, v in vars(args).items() if k not in ("json", "redis_url")}
    print_table(name, env, params, cases, took)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": name, "env": env, "params": params, "cases": cases}, f, indent=2)


def print_table(name: str, env: dict[str, Any], params: dict[str, Any], cases: list[CaseResult], took: float) -> None:
    by_name = {c["name"]: c for c in cases}
    print(
        f"\n{name}: {params}, {took:.0f} s; Python {env['python']} ({env['loop']}), "
        f"redis-py {env['redis_py']}, Redis {env['redis_server']}\n"
    )
    print("| case | median | min | max | unit | vs raw |\n|---|---:|---:|---:|---|---:|")
    for c in cases:
        base = by_name.get(c["baseline"] or "")
        ratio = f"{c['median'] / base['median']:.2f}x" if base and base["median"] else ""
        print(f"| {c['name']} | {c['median']:,.2f} | {c['min']:,.2f} | {c['max']:,.2f} | {c['unit']} | {ratio} |")


Source = aioredmq.Queue[Any] | aioredmq.Stream[Any]
GROUP = "g"
"""The consumer group of the stream cases."""


async def fill(mq: aioredmq.Client, kind: str, n: int, body: dict[str, Any]) -> Source:
    """An empty server, then ``n`` messages in a queue or a stream (with its group)."""
    await mq.redis.flushall()
    source: Source = mq.queue("bench") if kind == "queue" else mq.stream("bench")
    if isinstance(source, aioredmq.Stream):
        await source.create_group(GROUP, "begin")
    if n:
        await source.publish_many(body for _ in range(n))
    return source


async def length(source: Source) -> int:
    """Messages waiting: ready in a queue, entries in a stream."""
    if isinstance(source, aioredmq.Queue):
        return (await source.stats()).ready
    return (await source.stats()).length


async def check_drained(source: Source) -> None:
    """Nothing is left ready, in flight, pending or dead."""
    if isinstance(source, aioredmq.Queue):
        stats = await source.stats()
        assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
    else:
        group = (await source.stats()).groups[GROUP]
        assert (group.pending, group.lag, group.dead) == (0, 0, 0), group


def publish_many_case(url: str, kind: str, n: int, body: dict[str, Any]) -> Case:
    async def case() -> float:
        async with aioredmq.connect(url) as mq:
            source = await fill(mq, kind, 0, body)
            t = time.perf_counter()
            await source.publish_many(body for _ in range(n))
            rate = n / (time.perf_counter() - t)
            assert await length(source) == n
            return rate

    return case


def concurrent_publish_case(url: str, kind: str, n: int, body: dict[str, Any]) -> Case:
    """100 concurrent ``publish()`` calls of one message each, n // 100 times."""

    async def case() -> float:
        async with aioredmq.connect(url) as mq:
            source = await fill(mq, kind, 0, body)
            t = time.perf_counter()
            for _ in range(n // 100):
                await asyncio.gather(*(source.publish(body) for _ in range(100)))
            rate = n // 100 * 100 / (time.perf_counter() - t)
            assert await length(source) == n // 100 * 100
            return rate

    return case


def runner_case(url: str, kind: str, n: int, body: dict[str, Any], concurrency: int, prefetch: int) -> Case:
    async def case() -> float:
        async with aioredmq.connect(url) as mq:
            source = await fill(mq, kind, n, body)
            group = GROUP if kind == "stream" else None
            rate = await runner_rate(mq, source, n, group=group, concurrency=concurrency, prefetch=prefetch)
            await check_drained(source)
            return rate

    return case


def async_for_case(url: str, kind: str, n: int, body: dict[str, Any], prefetch: int) -> Case:
    """``async for`` over a consumer, reading each body and acking it."""

    async def case() -> float:
        async with aioredmq.connect(url) as mq:
            source = await fill(mq, kind, n, body)
            consumer = (
                source.consume(prefetch=prefetch)
                if isinstance(source, aioredmq.Queue)
                else source.consume(GROUP, prefetch=prefetch)
            )
            seen: set[str] = set()
            t = time.perf_counter()
            async with consumer:
                async for msg in consumer:
                    msg.body  # noqa: B018 - decoded on fetch; read it as the raw consumers do
                    seen.add(msg.id)
                    await msg.ack()
                    if len(seen) == n:
                        break
            rate = n / (time.perf_counter() - t)
            await check_drained(source)
            return rate

    return case


SWEEP = ((16, 64), (64, 256), (64, 1024), (128, 4096))
"""(concurrency, prefetch) pairs of the end-to-end runner cases."""


def aioredmq_e2e_cases(bench: Bench, url: str, kind: str, n: int, body: dict[str, Any], baseline: str) -> None:
    """The runner over the sweep, and ``async for`` + ack, on a pre-filled queue or stream."""
    label = "" if kind == "queue" else "stream "
    for concurrency, prefetch in SWEEP:
        name = f"aioredmq: {label}runner, concurrency {concurrency}, prefetch {prefetch}"
        bench.case(name, "e2e", runner_case(url, kind, n, body, concurrency, prefetch), baseline=baseline)
    for prefetch in (256, 4096):
        name = f"aioredmq: {label}async for + ack, prefetch {prefetch}"
        bench.case(name, "e2e", async_for_case(url, kind, n, body, prefetch), baseline=baseline)


def raw_concurrent_case(
    url: str,
    n: int,
    send: Callable[[aioredis.Redis], Awaitable[object]],
    count: Callable[[aioredis.Redis], Awaitable[int]],
) -> Case:
    """100 concurrent single commands (``send``), n // 100 times, on a pool of 100."""

    async def case() -> float:
        async with aioredis.Redis.from_url(url, max_connections=100) as r:
            await r.flushall()
            t = time.perf_counter()
            for _ in range(n // 100):
                await asyncio.gather(*(send(r) for _ in range(100)))
            rate = n // 100 * 100 / (time.perf_counter() - t)
            assert await count(r) == n // 100 * 100
            return rate

    return case


def make_bench(
    name: str, *parts: Callable[[Bench, str, int, dict[str, Any]], None]
) -> Callable[[argparse.Namespace, str], Coroutine[Any, Any, list[CaseResult]]]:
    """A script's ``make``: each part registers its cases, then all run."""

    async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
        bench = Bench(name, args)
        for part in parts:
            part(bench, url, args.messages, body_of(args.body_bytes))
        return await bench.run()

    return make


async def runner_rate(
    mq: aioredmq.Client,
    source: aioredmq.Queue[Any] | aioredmq.Stream[Any] | aioredmq.PartitionedQueue[Any],
    n: int,
    *,
    group: str | None = None,
    concurrency: int,
    prefetch: int,
) -> float:
    """Run ``mq.run`` with a handler that reads the body until ``n`` distinct messages
    were handled; the rate. Fails if any message was missed."""
    seen: set[str] = set()
    done = anyio.Event()

    async def handler(msg: aioredmq.Message[Any]) -> None:
        msg.body  # noqa: B018 - decoded on fetch; reading it keeps the comparison honest
        seen.add(msg.id)
        if len(seen) == n:
            done.set()

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(source, handler, group=group, concurrency=concurrency, prefetch=prefetch))
        await done.wait()
        tg.cancel_scope.cancel()
    rate = n / (time.perf_counter() - t)
    assert len(seen) == n, "every message delivered"
    return rate


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
