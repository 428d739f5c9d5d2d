"""The ``aioredmq`` command line: ``worker``, the operations commands (``stats``, ``peek``,
``dead``), ``bench`` and ``demo``.

This is the only module that installs signal handlers: ``worker`` turns SIGTERM and
SIGINT into a graceful stop of the runner (invariant 6).

Exit status: 0 when done; 1 when a dead-letter selector (``--id``, ``--reason``) matches
nothing (nothing is changed); 2 for a usage error, an unknown name or group, a handler
that cannot be loaded, or a Redis that refuses. Every error is one line on stderr,
``aioredmq <command>: ...``, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis

from . import ops
from .client import Client, connect
from .codecs import _BUILTIN as _CODECS
from .config import RetryPolicy
from .errors import AioredmqError, mapped
from .message import Message
from .partitioned import PartitionedQueue
from .queue import Queue
from .runner import check_handler
from .stream import Stream
from .testing import RedisServer

__all__ = ("main",)

Handler = Callable[[Message[Any]], Awaitable[object]]


class Failure(Exception):
    """What the command could not do, said in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- worker ------------------------------------------------------------------------------


def _load_handler(spec: str) -> Handler:
    """The async function ``spec`` (``package.module:function``) names, imported the way
    uvicorn and celery import an app: with the working directory first on ``sys.path``, so
    ``aioredmq worker myapp.handlers:handle`` works from the folder that holds ``myapp``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise Failure(f"handler {spec!r} must look like 'package.module:function'")
    cwd = os.getcwd()
    if sys.path[:1] not in ([""], [cwd]):  # a console script's own folder comes first otherwise
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and "." not in exc.name and module_name.split(".")[0] == exc.name:
            raise Failure(
                f"cannot import {module_name!r}: no module named {exc.name!r} in {cwd} or on sys.path "
                "(run the worker from the folder that holds the package, or set PYTHONPATH)"
            ) from None
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise Failure(f"cannot import {module_name!r}: no module named {exc.name!r}") from None
        raise Failure(f"cannot import {module_name!r}: {exc}{_where(exc)}") from None
    except SyntaxError as exc:
        raise Failure(f"cannot import {module_name!r}: SyntaxError: {exc}") from None
    except Exception as exc:
        raise Failure(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}{_where(exc)}") from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise Failure(f"module {module_name!r} has no {attr!r}{_async_functions(module)}")
        target = getattr(target, part)
    if not callable(target):
        kind = type(target).__name__
        raise Failure(f"{spec!r} is not an async function: it is of type {kind}{_async_functions(module)}")
    try:
        check_handler(target)
    except TypeError as exc:
        raise Failure(f"{spec!r}: {exc}") from None
    return target


def _where(exc: BaseException) -> str:
    """Where an import went wrong: the last line of the traceback that is not the import
    machinery's."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if len(frames) > 1 else ""


def _async_functions(module: object) -> str:
    names = sorted(n for n, v in vars(module).items() if not n.startswith("_") and inspect.iscoroutinefunction(v))
    return f" (its async functions: {', '.join(names[:10])})" if names else ""


async def _worker(args: argparse.Namespace, handler: Handler) -> int:
    retry = RetryPolicy(
        max_deliveries=args.max_deliveries,
        backoff_initial_s=args.backoff_initial_s,
        backoff_max_s=max(args.backoff_initial_s, 300.0),
    )
    ready = False
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

        def opened() -> None:  # the consumer is open: Redis answered and it registered
            nonlocal ready
            ready = True
            print(f"worker ready: {what} concurrency={args.concurrency}", flush=True)

        with anyio.CancelScope() as scope:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, scope.cancel)
            await mq.run(
                source,
                handler,
                group=args.group if args.stream is not None else None,
                name=args.name,
                concurrency=args.concurrency,
                prefetch=args.prefetch,
                handler_timeout_s=args.handler_timeout_s,
                grace_s=args.grace_s,
                opened=opened,
            )
    print("worker stopped gracefully" if ready else "worker stopped before Redis answered", flush=True)
    return 0


# -- bench and demo ----------------------------------------------------------------------


@contextlib.contextmanager
def _redis_for(url: str | None, *, say: bool = False) -> Iterator[str]:
    """``url``, or that of a throwaway redis-server started for the command."""
    if url is not None:
        yield url
        return
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        raise Failure(f"{exc}; or give --url") from None
    try:
        if say:
            print(f"started a throwaway redis-server on 127.0.0.1:{server.port}")
        yield server.url
    finally:
        server.stop()


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


async def _raw_rates(url: str, base: str, n: int) -> tuple[float, float]:
    """The same workload with raw redis-py: multi-value LPUSH, then a reliable consumer
    (a Lua move of 256 to a processing list, LREM acks). Its two lists are ``base``'s,
    under one hash tag, as a script's keys must be on a cluster."""
    take = "local m = redis.call('RPOP', KEYS[1], ARGV[1]) if not m then return {} end " \
           "redis.call('LPUSH', KEYS[2], unpack(m)) return m"  # fmt: skip
    ready, processing = f"{base}:ready", f"{base}:processing"
    values = [json.dumps({"n": i, "pad": "x" * 64}).encode() for i in range(n)]
    # mapped(): a refused connection or command reads as the library's own errors do.
    with mapped():
        async with Redis.from_url(url) as r:
            t0 = time.perf_counter()
            for i in range(0, n, 1000):
                await r.lpush(ready, *values[i : i + 1000])
            t_pub = time.perf_counter() - t0
            script = r.register_script(take)
            done = 0
            t1 = time.perf_counter()
            while done < n:
                items = await script(keys=[ready, processing], args=[256])
                async with r.pipeline(transaction=False) as pipe:
                    for item in items:
                        json.loads(item)
                        pipe.lrem(processing, -1, item)
                    await pipe.execute()
                done += len(items)
            return n / t_pub, n / (time.perf_counter() - t1)


async def _delete_bench_keys(url: str, prefix: str, run: str) -> None:
    """Delete every key of this run: its queues' (the producer's sequence key has a 24 h
    TTL) and the raw lists'. They all have a name starting with ``run``."""
    async with connect(url, prefix=prefix) as mq:
        keys = [key async for key in mq.redis.scan_iter(match=f"{prefix}:{{{run}*}}:*", count=1000)]
        for key in keys:  # one by one: on a cluster they are in different slots
            await mq.redis.unlink(key)


async def _bench(args: argparse.Namespace) -> int:
    run = f"bench-{os.urandom(4).hex()}"  # this run's names: no other queue's keys are touched
    results: dict[str, list[float]] = {k: [] for k in ("raw publish", "raw consume", "publish", "consume")}
    with _redis_for(args.url) as url:
        try:
            for r in range(args.rounds):
                raw_pub, raw_e2e = await _raw_rates(url, f"{args.prefix}:{{{run}-raw}}", args.messages)
                async with connect(url, prefix=args.prefix) as mq:
                    queue = mq.queue(f"{run}-{r}")
                    pub, e2e = await _throughput(mq, queue, args.messages, concurrency=64, prefetch=1024)
                for key, value in zip(results, (raw_pub, raw_e2e, pub, e2e), strict=True):
                    results[key].append(value)
        except BaseException:
            if args.url is not None:  # best effort: the error that stopped the run is the one to see
                with contextlib.suppress(Exception):
                    await _delete_bench_keys(url, args.prefix, run)
            raise
        if args.url is not None:  # a throwaway server goes with its keys
            await _delete_bench_keys(url, args.prefix, run)
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
    with _redis_for(args.url, say=True) as url:
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


# -- operations: stats, peek, dead -------------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    """Left-aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}"


def _consumers(consumers: dict[str, Any]) -> str:
    return ", ".join(f"{c} ({_ago(v['last_heartbeat_s_ago'])})" for c, v in consumers.items())


def _counts(row: dict[str, Any]) -> list[str]:
    return [str(row[k]) for k in ("ready", "in_flight", "delayed", "dead")]


def _stats_text(data: dict[str, Any]) -> str:
    out: list[str] = []
    if data["queues"]:
        rows = [["queue", "ready", "in flight", "delayed", "dead", "consumers (last heartbeat, s ago)"]]
        for name, q in data["queues"].items():
            rows.append([name, *_counts(q), _consumers(q["consumers"]) or "-"])
        out.append(_table(rows))
    if data["partitioned"]:
        rows = [["partitioned queue", "partitions", "ready", "in flight", "delayed", "dead",
                 "members (partitions held; last heartbeat, s ago)"]]  # fmt: skip
        for name, pq in data["partitioned"].items():
            members = ", ".join(
                f"{m} ({','.join(map(str, v['partitions'])) or 'none'}; {_ago(v['last_heartbeat_s_ago'])})"
                for m, v in pq["members"].items()
            )
            rows.append([name, str(pq["partitions"]), *_counts(pq), members or "-"])
            for part, p in pq.get("by_partition", {}).items():
                consumers = _consumers(p["consumers"])
                holder = p["holder"]
                if holder is not None and holder not in p["consumers"]:
                    consumers = ", ".join(x for x in (f"held by {holder}", consumers) if x)
                rows.append([part, "", *_counts(p), consumers or "-"])
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
    return "\n\n".join(out) or "no queues, partitioned queues or streams under this prefix"


def _messages_text(rows: list[dict[str, Any]], *, dead: bool = False) -> str:
    if not rows:
        return "none"
    partitioned = any("partition" in r for r in rows)
    table = [[*(["partition"] if partitioned else []), "id", "deliveries", "published",
              *(["dead at", "reason"] if dead else []), "body"]]  # fmt: skip
    for r in rows:
        where = [str(r.get("partition", ""))] if partitioned else []
        extra = [r["dead_at"], _cut(r["reason"], 100)] if dead else []
        if "undecodable" in r:
            table.append(
                [*where, r.get("entry_id") or "?", "", "", *extra, _cut(f"(undecodable: {r['undecodable']})", 60)]
            )
            continue
        table.append([*where, r["id"], str(r["deliveries"]), r["published_at"], *extra, _cut(r["body"], 60)])
    return _table(table)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(ops.as_json(data) if args.json else text)


async def _stats(args: argparse.Namespace) -> int:
    async with connect(args.url, prefix=args.prefix) as mq:
        data = await ops.stats_rows(mq, args.names, args.lease_s, partitions=args.partitions)
    _emit(args, data, _stats_text(data))
    return 0


async def _peek(args: argparse.Namespace) -> int:
    async with connect(args.url, prefix=args.prefix) as mq:
        source = ops.source_of(mq, args.name, await ops.discover(mq))
        rows = await ops.peek_rows(source, args.group, args.count)
    _emit(args, rows, _messages_text(rows))
    return 0


def _select(args: argparse.Namespace, records: ops.Chosen) -> ops.Chosen:
    """The records ``--id`` and ``--reason`` choose (all of them without either). A
    selector that matches nothing, or an ``--id`` that names no dead letter, is a
    :class:`Failure` with exit status 1 that says what there is."""
    if not (args.ids or args.reason):
        return records
    keep = {id(r) for r in ops.matching((r for _, r in records), args.ids, args.reason)}
    chosen = [(d, r) for d, r in records if id(r) in keep]
    have = {r.envelope.id for _, r in chosen if r.envelope is not None}
    missing = [i for i in dict.fromkeys(args.ids) if i not in have]
    if chosen and not missing:
        return chosen
    of = args.name + (f" (group {args.group})" if args.group else "")
    wanted = [f"--id {', '.join(missing)}"] if missing else []
    wanted += [f"--reason {args.reason!r}"] if args.reason else []
    if not records:
        there = f"{of} has no dead letters"
    else:
        looked = f" (looked at the oldest {len(records)}: see --limit)" if len(records) >= args.limit else ""
        ids = [r.envelope.id for _, r in records if r.envelope is not None]
        reasons = list(dict.fromkeys(_cut(r.reason, 60) for _, r in records))
        there = f"its {len(records)} dead letter(s){looked} have ids {', '.join(ids[:5])}"
        there += f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        there += f"; reasons: {'; '.join(repr(x) for x in reasons[:3])}" + (" ..." if len(reasons) > 3 else "")
    unchanged = "" if args.action == "list" else "; nothing was changed"
    raise Failure(f"no dead letter of {of} matches {' with '.join(wanted)}{unchanged}; {there}", code=1)


async def _dead(args: argparse.Namespace) -> int:
    if args.action != "list" and not (args.ids or args.reason or args.all):
        raise Failure("say which dead letters (--id, --reason) or --all")
    async with connect(args.url, prefix=args.prefix) as mq:
        source = ops.source_of(mq, args.name, await ops.discover(mq))
        dead = await ops.DeadLettersOf.of(source, args.group)
        chosen = _select(args, await dead.records(args.limit))
        if args.action == "list":
            rows = ops.dead_rows(chosen)
            _emit(args, rows, _messages_text(rows, dead=True))
            return 0
        everything = args.all and not (args.ids or args.reason)
        selected = None if everything else chosen
        done = await (dead.requeue(selected) if args.action == "requeue" else dead.purge(selected))
    verb = "requeued" if args.action == "requeue" else "purged"
    of = f" (group {args.group})" if args.group else ""
    _emit(args, {verb: done}, f"{verb} {done} dead letter(s) of {args.name}{of}")
    return 0


# -- the parser --------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is no value to show (a
    flag, or an option whose help says what leaving it out does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_URL = "redis://127.0.0.1:6379/0"
_SELECTED = (
    "Exit status 1 when --id or --reason matches no dead letter (nothing is changed); "
    "2 for an unknown name or group, or a usage error."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aioredmq",
        description="Reliable asyncio messaging on Redis.",
        epilog="Exit status: 0 when done; 1 when a dead-letter selector (--id, --reason) matches nothing; "
        "2 for an error, said in one line on stderr as 'aioredmq <command>: ...'.",
        formatter_class=_Help,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, help: str, description: str | None = None, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, formatter_class=_Help, **kw)

    def redis_options(
        c: argparse.ArgumentParser,
        json_output: bool = True,
        url: str | None = _URL,
        url_help: str = "the Redis to use",
        prefix: str = "aioredmq",
        prefix_help: str = "the key prefix the queues and streams were made with",
    ) -> None:
        c.add_argument("--url", default=url, help=url_help)
        c.add_argument("--prefix", default=prefix, help=prefix_help)
        if json_output:
            c.add_argument("--json", action="store_true", help="print JSON instead of a table")

    d = command("demo", "exchange messages through a throwaway redis-server")
    d.add_argument("--url", help="the Redis to use (default: start a throwaway redis-server)")
    d.add_argument(
        "--messages", metavar="N", type=int, default=100_000, help="how many messages the throughput part sends"
    )

    w = command(
        "worker",
        "run a handler on a queue, a partitioned queue or a stream's group until SIGTERM",
        "Run an async handler on every message of a queue, a partitioned queue or a stream's "
        "group. SIGTERM or SIGINT stops it gracefully: delivery stops, running handlers get "
        "--grace-s to finish. The handler is imported with the working directory first on "
        "sys.path. It prints 'worker ready: ...' once its consumer is open (it waits for Redis).",
    )
    w.add_argument("handler", help="package.module:function, an async function taking a Message")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--queue", metavar="NAME", help="a list queue (required: this, --stream or --partitioned)")
    source.add_argument(
        "--stream",
        metavar="NAME",
        help="a stream, read as a member of --group (required: this, --queue or --partitioned)",
    )
    source.add_argument(
        "--partitioned", metavar="NAME", help="a partitioned queue: per-key order (required: this, --queue or --stream)"
    )
    w.add_argument("--partitions", metavar="N", type=int, default=16, help="the partition count, for --partitioned")
    w.add_argument("--group", default="default", help="the consumer group, for --stream")
    w.add_argument(
        "--name", help="a fixed consumer name, so a restart resumes its own work (default: host, pid and a random tag)"
    )
    redis_options(w, json_output=False)
    w.add_argument("--codec", default="json", choices=list(_CODECS), help="how message bodies are encoded")
    w.add_argument("--concurrency", metavar="N", type=int, default=16, help="handlers running at once")
    w.add_argument(
        "--prefetch",
        metavar="N",
        type=int,
        help="messages fetched ahead (default: twice --concurrency, and at least 64)",
    )
    w.add_argument(
        "--lease-s", metavar="S", type=float, default=30.0, help="how long a silent worker keeps its messages"
    )
    w.add_argument(
        "--max-deliveries",
        metavar="N",
        type=int,
        default=5,
        help="deliveries before a failing message is dead-lettered",
    )
    w.add_argument(
        "--backoff-initial-s", metavar="S", type=float, default=1.0, help="the first retry's delay; it doubles"
    )
    w.add_argument(
        "--handler-timeout-s", metavar="S", type=float, help="cut a handler after this long (default: no limit)"
    )
    w.add_argument(
        "--grace-s", metavar="S", type=float, default=30.0, help="on SIGTERM, how long running handlers may finish"
    )

    st = command(
        "stats",
        "counts of every queue, partitioned queue and stream (or those named), and their consumers",
        "Counts of every queue, partitioned queue and stream under the prefix (or those "
        "named), their consumers and the age of their last heartbeat, and each stream "
        "group's pending, lag and dead counts. A name that has no keys is an error.",
    )
    st.add_argument(
        "names", nargs="*", help="queues, partitioned queues (NAME#I: one partition) or streams (default: all)"
    )
    redis_options(st)
    st.add_argument(
        "--lease-s", metavar="S", type=float, default=30.0,
        help="the lease to age heartbeats by, for consumers that do not record theirs (older versions)",
    )  # fmt: skip
    st.add_argument("--partitions", action="store_true", help="a row per partition of each partitioned queue too")

    pk = command(
        "peek",
        "the next messages of a queue, partitioned queue or stream, without taking them",
        "The next messages, without taking them: of a queue; of a partitioned queue (across "
        "its partitions, in publish order) or one partition (NAME#I); of a stream (from the "
        "start, or what --group has not been given yet).",
    )
    pk.add_argument("name", help="a queue, a partitioned queue (NAME#I: one partition) or a stream")
    redis_options(pk)
    pk.add_argument("--group", help="for a stream: what this group has not been given yet (default: from the start)")
    pk.add_argument("--count", metavar="N", type=int, default=10, help="how many messages")

    dd = command("dead", "list, requeue or purge dead letters", epilog=_SELECTED)
    actions = dd.add_subparsers(dest="action", required=True, metavar="action")
    for action, help in (
        ("list", "show dead letters, oldest first"),
        ("requeue", "deliver dead letters again, with a fresh delivery count"),
        ("purge", "delete dead letters"),
    ):
        a = actions.add_parser(action, help=help, description=f"{help[0].upper()}{help[1:]}.", epilog=_SELECTED,
                               formatter_class=_Help)  # fmt: skip
        a.add_argument("name", help="a queue, a partitioned queue (every partition's) or a stream (with --group)")
        redis_options(a)
        a.add_argument("--group", help="for a stream: whose dead letters (required for a stream)")
        a.add_argument(
            "--id", dest="ids", action="append", default=[], metavar="ID",
            help="only this message id (repeatable; each must name a dead letter; default: any id)",
        )  # fmt: skip
        a.add_argument(
            "--reason", help="only dead letters whose reason contains this text, in any case (default: any reason)"
        )
        a.add_argument("--limit", metavar="N", type=int, default=1000, help="look at the oldest N dead letters")
        if action != "list":
            a.add_argument("--all", action="store_true", help="every dead letter (required without --id or --reason)")

    b = command(
        "bench",
        "a short benchmark against raw redis-py in the same run",
        "A short benchmark: publish_many and the runner against raw redis-py doing the same "
        "work, in the same run. It starts its own throwaway redis-server unless --url is "
        "given; on a given Redis it uses keys of its own under --prefix and deletes them at the end.",
    )
    redis_options(
        b,
        url=None,
        url_help="use this Redis (default: start a throwaway redis-server)",
        prefix="aioredmq-bench",
        prefix_help="the prefix of the bench's keys",
    )
    b.add_argument("--messages", metavar="N", type=int, default=50_000, help="messages per round and case")
    b.add_argument("--rounds", metavar="N", type=int, default=3, help="rounds; the report gives their medians")
    return p


def _command_name(args: argparse.Namespace) -> str:
    return f"dead {args.action}" if args.command == "dead" else str(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "worker":
            handler = _load_handler(args.handler)
            return asyncio.run(_worker(args, handler))
        command = {"demo": _demo, "stats": _stats, "peek": _peek, "dead": _dead, "bench": _bench}[args.command]
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130
    except Failure as exc:
        print(f"aioredmq {_command_name(args)}: {exc}", file=sys.stderr)
        return exc.code
    except AioredmqError as exc:  # a wrong name, group or URL: say what, without a traceback
        print(f"aioredmq {_command_name(args)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
