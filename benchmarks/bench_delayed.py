"""How late delayed messages are delivered after their due time, to idle consumers.

    python -m benchmarks.bench_delayed [--messages N] [--rounds R] [--spacing-ms MS]
                                       [--loop asyncio|uvloop|both] [--redis-url URL] [--json FILE]

Starts its own redis-server on a free loopback port (or uses --redis-url; its data is
flushed). Four cases: a list queue and a stream, each with one consumer and with three
consumers racing on the same queue or group (each on its own client, as separate
workers would be). The consumers first sit idle for 0.5 s. Then N messages are published
one by one (concurrently) with ``at=``, message i due 0.5 s + i * MS after the publish
starts; the body carries the due time in Unix ms. On delivery, lateness is the wall
clock minus the due time.

Every round checks that no message came early (more than 1 ms before its due time),
that each was delivered exactly once and acked, and that nothing is left delayed,
ready, in flight or pending; otherwise it prints an error and exits non-zero. Each
figure (p50, p99, max lateness in ms) is the median over R rounds, with min and max,
for each event loop; the table says whether p99 and max stay within the 50 ms target
in every round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypedDict

import anyio
import redis

import aioredmq
from aioredmq.testing import RedisServer

from .common import CaseResult, environment

IDLE_S = 0.5
"""How long the consumers wait, idle, before the first publish."""
LEAD_S = 0.5
"""From the start of publishing to the first due time."""
EARLY_MS = -1.0
"""A delivery earlier than this (lateness in ms) is a bug."""
TARGET_MS = 50.0
"""The goal: when idle, a message is delivered within this long after its due time."""
GRACE_S = 0.1
"""After the last delivery: time for a duplicate delivery to show up."""
GROUP = "bench"
CASES: dict[str, tuple[str, int]] = {
    "queue, 1 consumer": ("queue", 1),
    "queue, 3 consumers racing": ("queue", 3),
    "stream, 1 consumer": ("stream", 1),
    "stream, 3 consumers racing": ("stream", 3),
}
FIGURES = ("p50", "p99", "max")


class BenchError(Exception):
    """A round broke a guarantee: early, lost, duplicated or unacked delivery."""


class Figure(TypedDict):
    """One lateness figure over all rounds, in ms."""

    median: float
    min: float
    max: float
    runs: list[float]


def _source(mq: aioredmq.Client, kind: str) -> aioredmq.Queue[Any] | aioredmq.Stream[Any]:
    return mq.queue("bench-delayed") if kind == "queue" else mq.stream("bench-delayed")


def _percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


async def _check_drained(source: aioredmq.Queue[Any] | aioredmq.Stream[Any], n: int) -> None:
    """After every consumer closed: each message was acked and nothing is left behind."""
    if isinstance(source, aioredmq.Queue):
        q = await source.stats()
        left = {"ready": q.ready, "in flight": q.in_flight, "delayed": q.delayed, "dead": q.dead}
    else:
        s = await source.stats()
        g = s.groups.get(GROUP)
        if s.length != n or g is None:
            raise BenchError(f"the stream holds {s.length} entries, expected {n}; groups {list(s.groups)}")
        left = {"delayed": s.delayed, "pending": g.pending, "undelivered": g.lag or 0, "dead": g.dead}
    if any(left.values()):
        raise BenchError(f"left behind after the round: {left}")


async def one_round(url: str, kind: str, consumers: int, n: int, spacing_ms: float) -> dict[str, float]:
    """One case, one round: p50, p99 and max lateness in ms."""
    lateness: dict[int, float] = {}
    deliveries: Counter[int] = Counter()
    acked = 0
    all_acked = anyio.Event()

    async def drain(consumer: aioredmq.Consumer[Any] | aioredmq.StreamConsumer[Any]) -> None:
        nonlocal acked
        async for msg in consumer:
            now_ms = time.time() * 1000
            i, due_ms = msg.body["i"], msg.body["due_ms"]
            deliveries[i] += 1
            lateness.setdefault(i, now_ms - due_ms)
            await msg.ack()
            acked += 1
            if acked == n:
                all_acked.set()

    async with aioredmq.connect(url) as mq:
        await mq.redis.flushall()
        source = _source(mq, kind)
        async with contextlib.AsyncExitStack() as stack:
            opened: list[aioredmq.Consumer[Any] | aioredmq.StreamConsumer[Any]] = []
            for _ in range(consumers):
                worker = _source(await stack.enter_async_context(aioredmq.connect(url)), kind)
                if isinstance(worker, aioredmq.Queue):
                    opened.append(await stack.enter_async_context(worker.consume()))
                else:
                    opened.append(await stack.enter_async_context(worker.consume(GROUP)))
            async with anyio.create_task_group() as tg:
                for consumer in opened:
                    tg.start_soon(drain, consumer)
                await anyio.sleep(IDLE_S)
                start = time.time()
                ats = [datetime.fromtimestamp(start + LEAD_S + i * spacing_ms / 1000, UTC) for i in range(n)]
                # The due time exactly as the library sends it (whole ms, rounded up).
                dues = [math.ceil(at.timestamp() * 1000) for at in ats]
                await asyncio.gather(
                    *(
                        source.publish({"i": i, "due_ms": due}, at=at)
                        for i, (due, at) in enumerate(zip(dues, ats, strict=True))
                    )
                )
                published_ms = time.time() * 1000
                if published_ms > dues[0]:
                    print(f"  warning: publishing ended {published_ms - dues[0]:.1f} ms after the first due time",
                          file=sys.stderr)  # fmt: skip
                with anyio.move_on_after(LEAD_S + n * spacing_ms / 1000 + 5.0):
                    await all_acked.wait()
                await anyio.sleep(GRACE_S)
                tg.cancel_scope.cancel()
        # Every consumer is closed now: each flushed its acks.
        missing = [i for i in range(n) if i not in deliveries]
        if missing:
            raise BenchError(f"{len(missing)} of {n} messages never delivered (first: {missing[:5]})")
        twice = {i: c for i, c in deliveries.items() if c > 1}
        if twice or len(deliveries) != n:
            raise BenchError(f"delivered more than once: {dict(list(twice.items())[:5])}; {len(deliveries)} distinct")
        early = {i: round(v, 2) for i, v in lateness.items() if v < EARLY_MS}
        if early:
            raise BenchError(
                f"{len(early)} message(s) delivered early (i: lateness ms): {dict(list(early.items())[:5])}"
            )
        await _check_drained(source, n)
    values = list(lateness.values())
    return {"p50": statistics.median(values), "p99": _percentile(values, 99), "max": max(values)}


def run_loop(
    loop: str, url: str, args: argparse.Namespace, factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> dict[str, dict[str, Figure]]:
    """Every case ``args.rounds`` times on one event loop; each figure's median, min and max."""
    runs: dict[str, dict[str, list[float]]] = {case: {f: [] for f in FIGURES} for case in CASES}
    with asyncio.Runner(loop_factory=factory) as runner:
        for r in range(args.rounds):
            for case, (kind, consumers) in CASES.items():
                got = runner.run(one_round(url, kind, consumers, args.messages, args.spacing_ms))
                for f in FIGURES:
                    runs[case][f].append(got[f])
                print(f"  {loop:<7} round {r + 1}/{args.rounds}  {case:<27} "
                      f"p50 {got['p50']:6.2f} ms  p99 {got['p99']:6.2f} ms  max {got['max']:6.2f} ms",
                      file=sys.stderr)  # fmt: skip
    return {
        case: {f: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for f, v in figs.items()}
        for case, figs in runs.items()
    }


def _cell(fig: Figure) -> str:
    return f"{fig['median']:.2f} ({fig['min']:.2f}-{fig['max']:.2f})"


def main(args: argparse.Namespace) -> dict[str, Any]:
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {}
    if args.loop in ("asyncio", "both"):
        loops["asyncio"] = None
    if args.loop in ("uvloop", "both"):
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop
    results: dict[str, dict[str, dict[str, Figure]]] = {}
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        t = time.perf_counter()
        for loop, factory in loops.items():
            results[loop] = run_loop(loop, url, args, factory)
        elapsed = time.perf_counter() - t
        server = redis.Redis.from_url(url).info("server")["redis_version"]
        env = environment(url, "+".join(loops))
    spread_s = (args.messages - 1) * args.spacing_ms / 1000
    print(
        f"\n{args.messages} delayed messages per round, due {LEAD_S} s to {LEAD_S + spread_s:.2f} s after publishing, "
        f"{args.spacing_ms:g} ms apart; consumers idle {IDLE_S} s first; {args.rounds} rounds in {elapsed:.0f} s; "
        f"Python {platform.python_version()}, redis-py {redis.__version__}, Redis {server}\n"
    )
    print("Lateness after the due time, ms: median of the rounds (min-max).\n")
    print(f"| case | loop | p50 | p99 | max | p99 < {TARGET_MS:g} ms | max < {TARGET_MS:g} ms |")
    print("|---|---|---:|---:|---:|:---:|:---:|")
    verdicts: dict[str, dict[str, dict[str, bool]]] = {}
    for case in CASES:
        for loop, cases in results.items():
            figs = cases[case]
            ok = {f"{f}_within_target": figs[f]["max"] < TARGET_MS for f in ("p99", "max")}
            verdicts.setdefault(loop, {})[case] = ok
            marks = ["yes" if v else "NO" for v in ok.values()]
            print(f"| {case} | {loop} | {_cell(figs['p50'])} | {_cell(figs['p99'])} | {_cell(figs['max'])} | "
                  f"{marks[0]} | {marks[1]} |")  # fmt: skip
    every = [v for cases in verdicts.values() for ok in cases.values() for v in ok.values()]
    p99_ok = all(ok["p99_within_target"] for cases in verdicts.values() for ok in cases.values())
    max_ok = all(every)
    print(f"\nTarget: when idle, a message is delivered within {TARGET_MS:g} ms of its due time "
          f"(judged on the worst round of each case).")  # fmt: skip
    print(f"  p99 under {TARGET_MS:g} ms in every case: {'yes' if p99_ok else 'NO'}")
    print(f"  max under {TARGET_MS:g} ms in every case: {'yes' if max_ok else 'NO'}")
    flat: list[CaseResult] = [
        {**figs[case][fig], "name": f"aioredmq: {case}, {loop}: lateness {fig}", "group": "delayed", "unit": "ms",
         "baseline": None}
        for case in CASES
        for loop, figs in results.items()
        for fig in FIGURES
    ]  # fmt: skip
    return {
        "benchmark": "delayed",
        "env": env,
        "params": {k: v for k, v in vars(args).items() if k not in ("json", "redis_url")},
        "cases": flat,
        "messages": args.messages,
        "spacing_ms": args.spacing_ms,
        "idle_s": IDLE_S,
        "lead_s": LEAD_S,
        "rounds": args.rounds,
        "target_ms": TARGET_MS,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": server,
        "p99_within_target": p99_ok,
        "max_within_target": max_ok,
        "results": {
            loop: {case: {**cases[case], **verdicts[loop][case]} for case in CASES} for loop, cases in results.items()
        },
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spacing-ms", type=float, default=5.0, help="between two due times (default 5)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--redis-url")
    parser.add_argument("--json", help="write the results here")
    ns = parser.parse_args()
    if ns.messages < 2 or ns.rounds < 1 or ns.spacing_ms < 0:
        parser.error("--messages must be at least 2, --rounds at least 1, --spacing-ms not negative")
    try:
        out = main(ns)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    cli()
