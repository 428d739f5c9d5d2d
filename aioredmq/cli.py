"""The ``aioredmq`` command line: ``demo`` and ``worker``.

This is the only module that installs signal handlers: ``worker`` turns SIGTERM and
SIGINT into a graceful stop of the runner (invariant 6).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from .client import connect
from .config import RetryPolicy
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

            n = args.messages
            bodies = [{"n": i, "pad": "x" * 64} for i in range(n)]
            t0 = time.perf_counter()
            await jobs.publish_many(bodies)
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
                tg.start_soon(mq.run, jobs, handler)
                await done.wait()
                tg.cancel_scope.cancel()
            t_e2e = time.perf_counter() - t1
            stats = await jobs.stats()
            if seen != n or stats.ready or stats.in_flight:
                raise RuntimeError(f"demo lost track of messages: handled {seen} of {n}, {stats}")
            print(
                f"throughput: publish_many {n / t_pub:,.0f} msg/s; consume+ack {n / t_e2e:,.0f} msg/s "
                f"({n:,} messages, all acked, {stats.ready} left)"
            )
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = {"demo": _demo, "worker": _worker}[args.command]
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
