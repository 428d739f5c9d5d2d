"""The ``aioredmq`` command line: ``demo`` and ``worker``.

This is the only module that installs signal handlers: ``worker`` turns SIGTERM and
SIGINT into a graceful stop of the runner (invariant 6).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis

from . import ops
from .client import Client, connect
from .config import RetryPolicy
from .errors import AioredmqError
from .message import Message
from .partitioned import PartitionedQueue
from .queue import Queue
from .stream import Stream
from .testing import RedisServer

__all__ = ("main",)


def _load_handler(spec: str) -> Callable[[Message[Any]], Awaitable[object]]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"handler {spec!r} must look like 'package.module:function'")
    handler = getattr(importlib.import_module(module_name), attr, None)
    if not callable(handler):
        raise SystemExit(f"{spec!r} is not a callable")
    return handler  # type: ignore[no-any-return]


async def _worker(args: argparse.Namespace) -> int:
    handler = _load_handler(args.handler)
    retry = RetryPolicy(
        max_deliveries=args.max_deliveries,
        backoff_initial_s=args.backoff_initial_s,
        backoff_max_s=max(args.backoff_initial_s, 300.0),
    )
    async with connect(args.url, prefix=args.prefix) as mq:
        source: Queue[Any] | Stream[Any] | PartitionedQueue[Any]
        if args.stream is not None:
            source = mq.stream(args.stream, lease_s=args.lease_s, retry=retry, codec=args.codec)
            what = f"stream={args.stream} group={args.group}"
        elif args.partitioned is not None:
            source = mq.partitioned(
                args.partitioned, partitions=args.partitions, lease_s=args.lease_s, retry=retry, codec=args.codec
            )
            what = f"partitioned={args.partitioned} partitions={args.partitions}"
        else:
            source = mq.queue(args.queue, lease_s=args.lease_s, retry=retry, codec=args.codec)
            what = f"queue={args.queue}"
        with anyio.CancelScope() as scope:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, scope.cancel)
            print(f"worker ready: {what} concurrency={args.concurrency}", flush=True)
            await mq.run(
                source,
                handler,
                group=args.group if args.stream is not None else None,
                name=args.name,
                concurrency=args.concurrency,
                prefetch=args.prefetch,
                handler_timeout_s=args.handler_timeout_s,
                grace_s=args.grace_s,
            )
    print("worker stopped gracefully", flush=True)
    return 0


async def _throughput(
    mq: Client, queue: Queue[Any], n: int, *, concurrency: int, prefetch: int | None
) -> tuple[float, float]:
    """``publish_many`` of ``n`` small bodies, then the runner handling them all: both
    rates. Raises if a message is missing or left behind."""
    bodies = [{"n": i, "pad": "x" * 64} for i in range(n)]
    t0 = time.perf_counter()
    await queue.publish_many(bodies)
    t_pub = time.perf_counter() - t0
    done = anyio.Event()
    seen = 0

    async def handler(msg: Message[Any]) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    t1 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(queue, handler, concurrency=concurrency, prefetch=prefetch))
        await done.wait()
        tg.cancel_scope.cancel()
    t_e2e = time.perf_counter() - t1
    stats = await queue.stats()
    if seen != n or stats.ready or stats.in_flight:
        raise RuntimeError(f"lost track of messages: handled {seen} of {n}, {stats}")
    return n / t_pub, n / t_e2e


async def _raw_rates(url: str, n: int) -> tuple[float, float]:
    """The same workload with raw redis-py: multi-value LPUSH, then a reliable consumer
    (a Lua move of 256 to a processing list, LREM acks)."""
    take = "local m = redis.call('RPOP', KEYS[1], ARGV[1]) if not m then return {} end " \
           "redis.call('LPUSH', KEYS[2], unpack(m)) return m"  # fmt: skip
    async with Redis.from_url(url) as r:
        await r.delete("aioredmq-bench:raw", "aioredmq-bench:processing")
        values = [json.dumps({"n": i, "pad": "x" * 64}).encode() for i in range(n)]
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            await r.lpush("aioredmq-bench:raw", *values[i : i + 1000])
        t_pub = time.perf_counter() - t0
        script = r.register_script(take)
        done = 0
        t1 = time.perf_counter()
        while done < n:
            items = await script(keys=["aioredmq-bench:raw", "aioredmq-bench:processing"], args=[256])
            async with r.pipeline(transaction=False) as pipe:
                for item in items:
                    json.loads(item)
                    pipe.lrem("aioredmq-bench:processing", -1, item)
                await pipe.execute()
            done += len(items)
        return n / t_pub, n / (time.perf_counter() - t1)


async def _bench(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(RedisServer()).url
        results: dict[str, list[float]] = {k: [] for k in ("raw publish", "raw consume", "publish", "consume")}
        for r in range(args.rounds):
            raw_pub, raw_e2e = await _raw_rates(url, args.messages)
            async with connect(url, prefix="aioredmq-bench") as mq:
                queue = mq.queue(f"bench-{r}")
                pub, e2e = await _throughput(mq, queue, args.messages, concurrency=64, prefetch=1024)
            for key, value in zip(results, (raw_pub, raw_e2e, pub, e2e), strict=True):
                results[key].append(value)
        med = {k: statistics.median(v) for k, v in results.items()}
    data = {
        "messages": args.messages,
        "rounds": args.rounds,
        "median_msg_per_s": med,
        "runs": results,
        "vs_raw": {
            "publish_many": med["publish"] / med["raw publish"],
            "end_to_end": med["consume"] / med["raw consume"],
        },
    }
    ratio = data["vs_raw"]
    text = _table(
        [
            [f"case (median of {args.rounds} rounds, {args.messages} messages)", "msg/s", "vs raw redis-py"],
            ["raw: LPUSH, 1000 values per command", f"{med['raw publish']:,.0f}", ""],
            ["aioredmq: publish_many", f"{med['publish']:,.0f}", f"{ratio['publish_many']:.2f}x"],
            ["raw: reliable consume (Lua move 256, LREM ack)", f"{med['raw consume']:,.0f}", ""],
            [
                "aioredmq: runner, concurrency 64, prefetch 1024",
                f"{med['consume']:,.0f}",
                f"{ratio['end_to_end']:.2f}x",
            ],
        ]
    )
    _emit(args, data, text)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            server = stack.enter_context(RedisServer())
            url = server.url
            print(f"started a throwaway redis-server on 127.0.0.1:{server.port}")
        async with connect(url, prefix="aioredmq-demo") as mq:
            jobs = mq.queue("jobs", retry=RetryPolicy(max_deliveries=3, backoff_initial_s=0.05))
            await jobs.purge_dead()
            ids = [await jobs.publish({"order": n, "item": item}) for n, item in enumerate(("tea", "cake", "jam"))]
            poison = await jobs.publish({"order": 3, "item": "poison"})
            print(f"published 4 messages, ids {ids[0]} .. {poison}")

            handled: list[str] = []
            poisoned = 0
            logging.getLogger("aioredmq.message").setLevel(logging.ERROR)  # the demo reports failures itself
            async with jobs.consume(prefetch=10, block_s=0.2) as consumer:
                async for msg in consumer:
                    async with msg.process():
                        if msg.body["item"] == "poison":
                            poisoned += 1
                            print(f"  handler raised on {msg.body} (delivery {msg.deliveries})")
                            raise ValueError("cannot handle poison")
                        handled.append(msg.body["item"])
                        print(f"  handled {msg.body} (delivery {msg.deliveries})")
                    if len(handled) == 3 and poisoned == 3:
                        break
            dead = await jobs.dead_letters()
            print(f"poison message dead-lettered after 3 deliveries: {dead[0].reason!r}")

            pub, e2e = await _throughput(mq, jobs, args.messages, concurrency=16, prefetch=None)
            print(
                f"throughput: publish_many {pub:,.0f} msg/s; consume+ack {e2e:,.0f} msg/s "
                f"({args.messages:,} messages, all acked, none left)"
            )
    return 0


# -- operations: stats, peek, dead -----------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    """Left-aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _stats_text(data: dict[str, Any]) -> str:
    out: list[str] = []
    if data["queues"]:
        rows = [["queue", "ready", "in flight", "delayed", "dead", "consumers (last heartbeat, s ago)"]]
        for name, q in data["queues"].items():
            consumers = ", ".join(f"{c} ({v['last_heartbeat_s_ago']:.1f})" for c, v in q["consumers"].items())
            rows.append(
                [name, str(q["ready"]), str(q["in_flight"]), str(q["delayed"]), str(q["dead"]), consumers or "-"]
            )
        out.append(_table(rows))
    if data["streams"]:
        rows = [["stream", "length", "delayed", "group", "pending", "lag", "dead", "consumers (pending, idle s)"]]
        for name, s in data["streams"].items():
            if not s["groups"]:
                rows.append([name, str(s["length"]), str(s["delayed"]), "-", "", "", "", ""])
            for g, info in s["groups"].items():
                consumers = ", ".join(f"{c} ({v['pending']}, {v['idle_s']:.1f})" for c, v in info["consumers"].items())
                lag = "?" if info["lag"] is None else str(info["lag"])
                rows.append([name, str(s["length"]), str(s["delayed"]), g, str(info["pending"]), lag, str(info["dead"]),
                             consumers or "-"])  # fmt: skip
        out.append(_table(rows))
    return "\n\n".join(out) or "no queues or streams under this prefix"


def _messages_text(rows: list[dict[str, Any]], *, dead: bool = False) -> str:
    if not rows:
        return "none"
    table = [["id", "attempts", "published", *(["dead at", "reason"] if dead else []), "body"]]
    for r in rows:
        if "undecodable" in r:
            table.append([r.get("entry_id") or "?", "", "", *([r["dead_at"], r["reason"]] if dead else []),
                          f"(undecodable: {r['undecodable']})"])  # fmt: skip
            continue
        body = r["body"] if len(r["body"]) <= 60 else r["body"][:57] + "..."
        extra = [r["dead_at"], r["reason"][:60]] if dead else []
        table.append([r["id"], str(r["attempts"]), r["published_at"], *extra, body])
    return _table(table)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(ops.as_json(data) if args.json else text)


async def _stats(args: argparse.Namespace) -> int:
    async with connect(args.url, prefix=args.prefix) as mq:
        names = args.names or [f.name for f in await ops.discover(mq)]
        data = await ops.stats_rows(mq, names, args.lease_s)
    _emit(args, data, _stats_text(data))
    return 0


async def _peek(args: argparse.Namespace) -> int:
    async with connect(args.url, prefix=args.prefix) as mq:
        source = await ops.source_of(mq, args.name)
        if isinstance(source, Queue):
            ops.needs_group(source, args.group)
            rows = [ops.message_row(raw) for raw in await source.peek(args.count)]
        else:
            rows = [ops.message_row(raw, entry_id) for entry_id, raw in await source.peek(args.group, args.count)]
    _emit(args, rows, _messages_text(rows))
    return 0


async def _dead(args: argparse.Namespace) -> int:
    async with connect(args.url, prefix=args.prefix) as mq:
        source = await ops.source_of(mq, args.name)
        group = ops.needs_group(source, args.group)
        dead = ops.DeadLettersOf(source, group)
        chosen = ops.matching(await dead.records(args.limit), args.ids, args.reason)
        if args.action == "list":
            rows = ops.dead_rows(chosen)
            _emit(args, rows, _messages_text(rows, dead=True))
            return 0
        if not (args.ids or args.reason or args.all):
            raise SystemExit(f"dead {args.action}: say which (--id, --reason) or --all")
        everything = args.all and not (args.ids or args.reason)
        ids = None if everything else [r.envelope.id for r in chosen if r.envelope is not None]
        done = 0
        if ids != []:
            done = await (dead.requeue(ids) if args.action == "requeue" else dead.purge(ids))
    verb = "requeued" if args.action == "requeue" else "purged"
    _emit(args, {verb: done}, f"{verb} {done} dead letter(s) of {args.name}" + (f" (group {group})" if group else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aioredmq", description="Reliable asyncio messaging on Redis.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="exchange messages through a throwaway redis-server")
    d.add_argument("--url", help="use this Redis instead of starting one")
    d.add_argument("--messages", type=int, default=100_000)

    w = sub.add_parser("worker", help="run a handler on a queue or a stream's group until SIGTERM")
    w.add_argument("handler", help="package.module:function taking a Message")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--queue")
    source.add_argument("--stream")
    source.add_argument("--partitioned", help="a partitioned queue: per-key order")
    w.add_argument("--partitions", type=int, default=16, help="the partition count, for --partitioned")
    w.add_argument("--group", default="default", help="the consumer group, for --stream")
    w.add_argument("--name", default=None, help="a fixed consumer name, so a restart resumes its own work")
    w.add_argument("--url", default="redis://127.0.0.1:6379/0")
    w.add_argument("--prefix", default="aioredmq")
    w.add_argument("--codec", default="json")
    w.add_argument("--concurrency", type=int, default=16)
    w.add_argument("--prefetch", type=int, default=None)
    w.add_argument("--lease-s", type=float, default=30.0)
    w.add_argument("--max-deliveries", type=int, default=5)
    w.add_argument("--backoff-initial-s", type=float, default=1.0)
    w.add_argument("--handler-timeout-s", type=float, default=None)
    w.add_argument("--grace-s", type=float, default=30.0)

    def ops_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default="redis://127.0.0.1:6379/0")
        c.add_argument("--prefix", default="aioredmq")
        c.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return c

    st = ops_command("stats", "counts of every queue and stream (or those named), and their consumers")
    st.add_argument("names", nargs="*", help="queues or streams; default: all under the prefix")
    st.add_argument("--lease-s", type=float, default=30.0, help="the consumers' lease, to age their heartbeats")

    pk = ops_command("peek", "the next messages of a queue, or of a stream's group, without taking them")
    pk.add_argument("name")
    pk.add_argument("--group", help="for a stream: what this group has not been given yet")
    pk.add_argument("--count", type=int, default=10)

    dd = sub.add_parser("dead", help="list, requeue or purge dead letters")
    actions = dd.add_subparsers(dest="action", required=True)
    for action, help in (("list", "show dead letters"), ("requeue", "deliver again"), ("purge", "delete")):
        a = actions.add_parser(action, help=help)
        a.add_argument("name")
        a.add_argument("--url", default="redis://127.0.0.1:6379/0")
        a.add_argument("--prefix", default="aioredmq")
        a.add_argument("--json", action="store_true", help="print JSON instead of a table")
        a.add_argument("--group", help="for a stream: whose dead letters")
        a.add_argument("--id", dest="ids", action="append", default=[], help="only this message id (repeatable)")
        a.add_argument("--reason", help="only dead letters whose reason contains this text")
        a.add_argument("--limit", type=int, default=1000, help="look at the oldest N dead letters")
        if action != "list":
            a.add_argument("--all", action="store_true", help="every dead letter (needed without --id/--reason)")

    b = ops_command("bench", "a short benchmark against raw redis-py in the same run")
    b.set_defaults(url=None)
    b.add_argument("--messages", type=int, default=50_000)
    b.add_argument("--rounds", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"demo": _demo, "worker": _worker, "stats": _stats, "peek": _peek, "dead": _dead, "bench": _bench}[
        args.command
    ]
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130
    except AioredmqError as exc:  # a wrong name, group or URL: say what, without a traceback
        print(f"aioredmq {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
