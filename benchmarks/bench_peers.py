"""End-to-end consume rates of aioredmq, raw redis-py and peer libraries, on one server in one run.

    python -m benchmarks.bench_peers [--messages N] [--rounds R] [--body-bytes B]
                                     [--loop asyncio|uvloop] [--redis-url URL] [--json FILE]

Starts its own redis-server on a free loopback port (or uses --redis-url; its data is
flushed), runs every case R times with the rounds interleaved, and prints the median
with min and max, and each figure as a ratio of the raw redis-py case of the same
kind (list or stream) measured in the same run. A peer library that cannot be imported
is skipped with a message on stderr.

Every case flushes the server, pre-fills N messages (JSON bodies of B bytes, each with
a distinct number ``n``) with the library's own publisher, batched where the library
offers it (not timed), then times consuming and finishing all N with a handler that
reads the decoded body and does nothing else. "Finishing" includes the ack where there
is one: a stream case stops the clock once nothing is pending in the group, saq once the
last job was marked complete. Every round checks that all N distinct numbers arrived
and that nothing is left ready, in flight or pending; a case that does not finish
within 120 s fails the run with an error saying so. Each peer's broker or worker is
stopped and its connections closed after its case; a case that leaves tasks running or
clients connected gets a warning on stderr. Cases named "N/10" handle a tenth of
the messages: they run at 1-3k msg/s, and all N would take most of the run.

Cases, and what each mode guarantees (what a crash of the consuming process loses):

- ``raw: reliable list consume (Lua move 256, LREM ack)``: a Lua script moves 256 from
  the list into a processing list, json.loads each, a pipeline of LREM acks them. Nothing
  is lost, but nothing here recovers the processing list either. Baseline of the list cases.
- ``raw: naive list consume (BLMPOP 256, no ack)``: BLMPOP 256 at a time, json.loads
  each. At most once: a crash loses the batch being handled.
- ``raw: stream group consume (XREADGROUP 256, XACK)``: XREADGROUP COUNT 256, json.loads
  each, one XACK per batch. Unacked entries stay pending; nothing here reclaims them.
  Baseline of the stream cases.
- ``aioredmq: list runner`` / ``aioredmq: stream runner`` (concurrency 64, prefetch
  1024): ``mq.run`` (the group created at the beginning of the stream before the fill);
  acked after each handler; a dead consumer's messages are taken back after its lease
  (list) or claimed by the group's sweep (stream). At least once.
- ``faststream: list, 1 per BLPOP``: ``ListSub`` (BLPOP one message, handle, repeat).
  ``faststream: list, batch 256``: ``ListSub(batch=True, max_records=256)`` (LPOP 256,
  one handler call per batch). Pre-filled by ``publish_batch`` (RPUSH 1000). FastStream
  lists have no acks: a message is gone from Redis once popped, so a crash loses what
  was popped and not yet handled. At most once.
- ``faststream: stream group, read 256, ...``: ``StreamSub(group=, consumer=,
  max_records=256)``: XREADGROUP 256, then one handler call and one XACK per entry, in
  turn, or with ``max_workers=64`` concurrently. ``faststream: stream group, batch 256``
  adds ``batch=True``: one handler call and one XACK per 256. Pre-filled by ``publish``
  into pipelines of 1000 XADD, the group created at the start of the stream first
  (FastStream would create it at ``$``, after the pre-filled entries). Acked after the
  handler (the default ``REJECT_ON_ERROR``). A crash leaves the entries pending: only a
  subscriber configured with ``min_idle_time`` (XAUTOCLAIM) takes them back, which a
  plain one is not. At least once with that extra subscriber; otherwise they wait.
- ``taskiq-redis: ListQueueBroker, 64 tasks``: tasks kicked one LPUSH each (1000
  concurrent kicks), run by a ``taskiq.receiver.Receiver`` with ``max_async_tasks=64``,
  in-process, as ``taskiq worker`` runs it; the broker BRPOPs one message at a time. No
  acks: a crash loses what was popped and not finished. At most once.
- ``taskiq-redis: RedisStreamBroker, 64 tasks, read 256``: tasks kicked one XADD each,
  the same receiver, ``xread_count=256``, the group created at ``0``; one XACK per task
  after it ran (also when it raised: retries need a middleware). After each read the
  broker XAUTOCLAIMs entries idle longer than ``idle_timeout`` (10 min by default), so a
  crash's entries are run again after that. At least once.
- ``saq: worker, concurrency 64``: jobs enqueued one Lua call each (1000 concurrent
  calls; saq has no batch enqueue: ``Queue.batch()`` only aborts its jobs on error), a
  ``saq.Worker`` with ``concurrency=64``. Per job: BLMOVE to an active list, GET the job,
  SET and PUBLISH it active, run it, a MULTI of LREM, ZREM and SETEX to mark it complete,
  PUBLISH. The clock stops when the last job was marked complete (``after_process``).
  A dead worker's job stays in the active list until a sweep (every 60 s) finds it past
  its timeout (10 s by default); it is retried if it has retries left, and with the
  default ``retries=1`` (one attempt) marked aborted instead: recorded, not run again.

Left out: FastStream's list subscriber with ``max_workers`` (it still pops one message
per BLPOP; tried with 64, it was no faster); FastStream's batch subscribers with
``max_workers`` (they ignore it); FastStream's stream subscriber without a group (XREAD,
nothing acked, and a restart starts at ``$``); a FastStream batch publish for streams
(``publish_batch`` is for lists only). arq is not here: it requires ``redis<6``, and this
project runs on redis-py 8. taskiq has no batch kick, and its ``PubSubBroker``
broadcasts rather than queues. saq has no stream mode. Peers log nothing
per message here: FastStream runs with ``logger=None``; taskiq and saq log at INFO,
which the default WARNING level drops (saq's warning on stop, that its upkeep tasks
outlived a zero grace period, is silenced).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis

import aioredmq

from .common import Bench, CaseResult, body_of, main, runner_rate

TIMEOUT_S = 120.0
"""A case that has not finished by then fails the run."""
STOP_TIMEOUT_S = 20.0
"""For stopping a peer's worker or broker after its case."""
BATCH = 256
"""Messages per read, where the consumer reads in batches."""
CONCURRENCY = 64
FILL_CHUNK = 1000
"""Messages per pre-fill batch, pipeline or gather."""
FEW = ", N/10"
"""Named cases get a tenth of the messages: at 1-3k msg/s, all of them would take most of the run."""

# The raw reliable consumer: move a batch into a processing list in one Lua call, ack by LREM.
RAW_TAKE = """
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then return {} end
redis.call('LPUSH', KEYS[2], unpack(items))
return items
"""


def bodies_of(n: int, size: int) -> list[dict[str, Any]]:
    """``n`` bodies like ``body_of(size)``, body ``i`` numbered ``"n": i``; the padding
    is shortened by the number's length, so each still encodes to about ``size`` bytes."""
    base = body_of(size)
    out = []
    for i in range(n):
        extra = len(f', "n": {i}')
        out.append({**base, "pad": base["pad"][: max(0, len(base["pad"]) - extra)], "n": i})
    return out


def chunks(items: list[Any], size: int = FILL_CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def optional(module: str, peer: str) -> Any:
    """The peer module, or None with a note on stderr if it cannot be imported. Peers are
    used untyped (Any): they are optional, and their overloads differ between versions."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(f"bench_peers: skipping the {peer} cases: {exc}", file=sys.stderr)
        return None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class Seen:
    """The distinct body numbers handled; ``done`` once all ``n`` of them came."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.numbers: set[int] = set()
        self.done = asyncio.Event()

    def add(self, body: dict[str, Any]) -> None:
        self.numbers.add(body["n"])
        if len(self.numbers) == self.n:
            self.done.set()

    async def wait(self, *workers: asyncio.Task[Any]) -> None:
        """Until all came; fails at once if a worker task ends first (it crashed)."""
        waiter = asyncio.ensure_future(self.done.wait())
        try:
            finished, _ = await asyncio.wait({waiter, *workers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter not in finished:
            worker = finished.pop()
            cause = None if worker.cancelled() else worker.exception()
            raise RuntimeError(f"the consumer stopped after {len(self.numbers)} of {self.n} messages") from cause

    def check(self) -> None:
        if self.numbers != set(range(self.n)):
            raise RuntimeError(f"{len(self.numbers)} of {self.n} distinct messages arrived")


def guarded(name: str, url: str, fn: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
    """``fn``, failing with a clear error if it takes longer than ``TIMEOUT_S``, and
    warning on stderr if it left tasks running or connections open."""

    async def case() -> float:
        before = asyncio.all_tasks()
        timeout = asyncio.timeout(TIMEOUT_S)
        try:
            async with timeout:
                rate = await fn()
        except TimeoutError:
            if timeout.expired():
                raise RuntimeError(f"{name}: did not finish within {TIMEOUT_S:g} s") from None
            raise
        await leftovers(name, url, before)
        return rate

    return case


async def leftovers(name: str, url: str, tasks_before: set[asyncio.Task[Any]]) -> None:
    """Warn if tasks a case started still run, or clients are still connected, after a
    moment to settle. Other clients of a server given by --redis-url count too."""
    tasks: set[asyncio.Task[Any]] = set()
    clients = 0
    async with aioredis.Redis.from_url(url) as r:
        for _ in range(100):
            tasks = asyncio.all_tasks() - tasks_before
            clients = len(await r.client_list()) - 1  # not this one
            if not tasks and not clients:
                return
            await asyncio.sleep(0.01)
    print(f"bench_peers: {name} left {len(tasks)} tasks running, {clients} clients connected", file=sys.stderr)


async def within(what: str, aw: Awaitable[Any], timeout_s: float = STOP_TIMEOUT_S) -> Any:
    """``await aw``, failing with a clear error after ``timeout_s``."""
    timeout = asyncio.timeout(timeout_s)
    try:
        async with timeout:
            return await aw
    except TimeoutError:
        if timeout.expired():
            raise RuntimeError(f"{what} did not finish within {timeout_s:g} s") from None
        raise


async def until_acked(r: aioredis.Redis, stream: str, group: str) -> None:
    """Until the group has nothing pending: the last acks may land after the last handler."""
    while (await r.xpending(stream, group))["pending"]:  # noqa: ASYNC110 - polls Redis: no event to wait on
        await asyncio.sleep(0.001)


async def xgroup_begin(r: aioredis.Redis, stream: str, group: str) -> None:
    """Create the group at the start of the stream, before it is filled."""
    await r.xgroup_create(stream, group, id="0", mkstream=True)


@contextlib.asynccontextmanager
async def background(what: str, coro: Awaitable[Any], stop: Callable[[], Awaitable[Any]]) -> AsyncIterator[Any]:
    """Run ``coro`` as a task; on exit ``stop()`` and wait for the task to end. Raises
    what the task raised, unless the block raised; cancels it if it does not end."""
    task = asyncio.ensure_future(coro)

    async def settle() -> BaseException | None:
        hung = False
        try:
            await within(f"{what}: stop", stop())
        finally:
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            if not task.done():
                hung = True
                task.cancel()
                await asyncio.wait({task})
        if hung:
            return RuntimeError(f"{what} did not end within {STOP_TIMEOUT_S:g} s of its stop")
        return None if task.cancelled() else task.exception()

    try:
        yield task
    except BaseException:
        try:
            await settle()
        except Exception as exc:  # the block's error is the one to report
            print(f"bench_peers: {exc}", file=sys.stderr)
        raise
    if (error := await settle()) is not None:
        raise error


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def raw_cases(bench: Bench, url: str, bodies: list[dict[str, Any]]) -> tuple[str, str]:
    n = len(bodies)
    encoded = [json.dumps(b).encode() for b in bodies]

    async def fill_list(r: aioredis.Redis) -> None:
        await r.flushall()
        for chunk in chunks(encoded):
            await r.lpush("ready", *chunk)

    async def reliable() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await fill_list(r)
            take = r.register_script(RAW_TAKE)
            seen = Seen(n)
            t = time.perf_counter()
            while not seen.done.is_set():
                items = await take(keys=["ready", "processing"], args=[BATCH])
                async with r.pipeline(transaction=False) as pipe:
                    for item in items:
                        seen.add(json.loads(item))
                        pipe.lrem("processing", -1, item)
                    await pipe.execute()
            rate = n / (time.perf_counter() - t)
            seen.check()
            assert (await r.llen("ready"), await r.llen("processing")) == (0, 0)
            return rate

    async def naive() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await fill_list(r)
            seen = Seen(n)
            t = time.perf_counter()
            while not seen.done.is_set():
                # The raw command: redis-py's typed blmpop() reply is a union mypy cannot narrow.
                reply: Any = await r.execute_command(  # type: ignore[no-untyped-call]
                    "BLMPOP", 1, 1, "ready", "RIGHT", "COUNT", BATCH
                )
                for item in reply[1] if reply else ():
                    seen.add(json.loads(item))
            rate = n / (time.perf_counter() - t)
            seen.check()
            assert await r.llen("ready") == 0
            return rate

    async def group() -> float:
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
            await xgroup_begin(r, "s", "g")
            for chunk in chunks(encoded):
                async with r.pipeline(transaction=False) as pipe:
                    for item in chunk:
                        pipe.xadd("s", {"m": item})
                    await pipe.execute()
            seen = Seen(n)
            t = time.perf_counter()
            while not seen.done.is_set():
                reply: Any = await r.execute_command(  # type: ignore[no-untyped-call]
                    "XREADGROUP", "GROUP", "g", "c", "COUNT", BATCH, "BLOCK", 1000, "STREAMS", "s", ">"
                )
                entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
                for _, fields in entries:
                    seen.add(json.loads(fields[b"m"]))
                if entries:
                    await r.xack("s", "g", *[entry_id for entry_id, _ in entries])
            rate = n / (time.perf_counter() - t)
            seen.check()
            assert (await r.xpending("s", "g"))["pending"] == 0
            return rate

    raw_list = "raw: reliable list consume (Lua move 256, LREM ack)"
    raw_stream = "raw: stream group consume (XREADGROUP 256, XACK)"
    add(bench, url, raw_list, reliable)
    add(bench, url, "raw: naive list consume (BLMPOP 256, no ack)", naive)
    add(bench, url, raw_stream, group)
    return raw_list, raw_stream


def aioredmq_cases(bench: Bench, url: str, bodies: list[dict[str, Any]], raw_list: str, raw_stream: str) -> None:
    n = len(bodies)
    prefetch = 1024

    async def list_runner() -> float:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            q = mq.queue("bench")
            await q.publish_many(bodies)
            rate = await runner_rate(mq, q, n, concurrency=CONCURRENCY, prefetch=prefetch)
            stats = await q.stats()
            assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
            return rate

    async def stream_runner() -> float:
        async with aioredmq.connect(url) as mq:
            await mq.redis.flushall()
            s = mq.stream("bench")
            await s.create_group("g", "begin")
            await s.publish_many(bodies)
            rate = await runner_rate(mq, s, n, group="g", concurrency=CONCURRENCY, prefetch=prefetch)
            assert (await s.stats()).groups["g"].pending == 0
            return rate

    settings = f"concurrency {CONCURRENCY}, prefetch {prefetch}"
    add(bench, url, f"aioredmq: list runner, {settings}", list_runner, baseline=raw_list)
    add(bench, url, f"aioredmq: stream runner, {settings}", stream_runner, baseline=raw_stream)


def faststream_cases(bench: Bench, url: str, bodies: list[dict[str, Any]], raw_list: str, raw_stream: str) -> None:
    fs: Any = optional("faststream.redis", "faststream")
    if fs is None:
        return
    few = bodies[: max(1, len(bodies) // 10)]

    async def run(
        subscribe: Callable[[Any, Seen], None],
        fill: Callable[[Any, Any, list[dict[str, Any]]], Awaitable[None]],
        bodies: list[dict[str, Any]],
    ) -> float:
        """Pre-fill with ``fill(broker, redis, bodies)``, then time a started broker whose
        subscriber ``subscribe(broker, seen)`` registered, until all came and were acked."""
        n = len(bodies)
        broker = fs.RedisBroker(url, logger=None)
        seen = Seen(n)
        subscribe(broker, seen)
        try:
            r = await broker.connect()
            await r.flushall()
            await fill(broker, r, bodies)
            t = time.perf_counter()
            await broker.start()
            await seen.wait()
            if await r.exists("fs-stream"):
                await until_acked(r, "fs-stream", "g")
            rate = n / (time.perf_counter() - t)
        finally:
            await within("faststream broker.stop()", broker.stop())
        seen.check()
        async with aioredis.Redis.from_url(url) as r:
            assert await r.llen("fs-list") == 0
            if await r.exists("fs-stream"):
                assert (await r.xpending("fs-stream", "g"))["pending"] == 0
        return rate

    async def fill_list(broker: Any, _: Any, bodies: list[dict[str, Any]]) -> None:
        for chunk in chunks(bodies):
            await broker.publish_batch(*chunk, list="fs-list")

    async def fill_stream(broker: Any, r: Any, bodies: list[dict[str, Any]]) -> None:
        await xgroup_begin(r, "fs-stream", "g")
        for chunk in chunks(bodies):
            async with r.pipeline(transaction=False) as pipe:
                for body in chunk:
                    await broker.publish(body, stream="fs-stream", pipeline=pipe)
                await pipe.execute()

    def list_one(broker: Any, seen: Seen) -> None:
        async def handle(body: dict[str, Any]) -> None:
            seen.add(body)

        broker.subscriber(list=fs.ListSub("fs-list"))(handle)

    def list_batch(broker: Any, seen: Seen) -> None:
        async def handle(bodies: list[dict[str, Any]]) -> None:
            for body in bodies:
                seen.add(body)

        broker.subscriber(list=fs.ListSub("fs-list", batch=True, max_records=BATCH))(handle)

    def stream_one(workers: int) -> Callable[[Any, Seen], None]:
        def subscribe(broker: Any, seen: Seen) -> None:
            async def handle(body: dict[str, Any]) -> None:
                seen.add(body)

            sub = fs.StreamSub("fs-stream", group="g", consumer="c", max_records=BATCH)
            broker.subscriber(stream=sub, max_workers=workers if workers > 1 else None)(handle)

        return subscribe

    def stream_batch(broker: Any, seen: Seen) -> None:
        async def handle(bodies: list[dict[str, Any]]) -> None:
            for body in bodies:
                seen.add(body)

        sub = fs.StreamSub("fs-stream", group="g", consumer="c", batch=True, max_records=BATCH)
        broker.subscriber(stream=sub)(handle)

    one = f"faststream: stream group, read {BATCH}"
    cases = {
        f"faststream: list, 1 per BLPOP{FEW}": (list_one, fill_list, few, raw_list),
        f"faststream: list, batch {BATCH}": (list_batch, fill_list, bodies, raw_list),
        f"{one}, 1 per handler{FEW}": (stream_one(1), fill_stream, few, raw_stream),
        f"{one}, max_workers {CONCURRENCY}{FEW}": (stream_one(CONCURRENCY), fill_stream, few, raw_stream),
        f"faststream: stream group, batch {BATCH}": (stream_batch, fill_stream, bodies, raw_stream),
    }
    for name, (subscribe, fill, some, baseline) in cases.items():
        add(bench, url, name, functools.partial(run, subscribe, fill, some), baseline=baseline)


def taskiq_cases(bench: Bench, url: str, bodies: list[dict[str, Any]], raw_list: str, raw_stream: str) -> None:
    taskiq_redis: Any = optional("taskiq_redis", "taskiq-redis")
    receiver_module: Any = optional("taskiq.receiver", "taskiq-redis") if taskiq_redis else None
    if taskiq_redis is None or receiver_module is None:
        return
    few = bodies[: max(1, len(bodies) // 10)]

    async def run(make_broker: Callable[[], Any], stream: str | None) -> float:
        n = len(few)
        broker = make_broker()
        seen = Seen(n)

        async def noop(body: dict[str, Any]) -> None:
            seen.add(body)

        task = broker.register_task(noop, task_name="noop")
        async with aioredis.Redis.from_url(url) as r:
            await r.flushall()
        try:
            await broker.startup()  # declares a stream broker's consumer group
            for chunk in chunks(few):
                await asyncio.gather(*(task.kiq(body) for body in chunk))
            receiver = receiver_module.Receiver(broker, max_async_tasks=CONCURRENCY, run_startup=False)
            finish = asyncio.Event()

            async def stop() -> None:
                finish.set()

            t = time.perf_counter()
            async with background("taskiq receiver", receiver.listen(finish), stop) as listening:
                await seen.wait(listening)
                if stream:
                    async with aioredis.Redis.from_url(url) as r:
                        await until_acked(r, stream, "g")
                rate = n / (time.perf_counter() - t)
        finally:
            await within("taskiq broker.shutdown()", broker.shutdown())
        seen.check()
        async with aioredis.Redis.from_url(url) as r:
            if stream:
                assert (await r.xpending(stream, "g"))["pending"] == 0
            else:
                assert await r.llen("tq-list") == 0
        return rate

    def list_broker() -> Any:
        return taskiq_redis.ListQueueBroker(url, queue_name="tq-list")

    def stream_broker() -> Any:
        return taskiq_redis.RedisStreamBroker(
            url, queue_name="tq-stream", consumer_group_name="g", consumer_id="0", xread_count=BATCH
        )

    name = f"taskiq-redis: ListQueueBroker, {CONCURRENCY} tasks{FEW}"
    add(bench, url, name, functools.partial(run, list_broker, None), baseline=raw_list)
    if hasattr(taskiq_redis, "RedisStreamBroker"):
        name = f"taskiq-redis: RedisStreamBroker, {CONCURRENCY} tasks, read {BATCH}{FEW}"
        add(bench, url, name, functools.partial(run, stream_broker, "tq-stream"), baseline=raw_stream)


def saq_cases(bench: Bench, url: str, bodies: list[dict[str, Any]], raw_list: str) -> None:
    saq: Any = optional("saq", "saq")
    if saq is None:
        return
    few = bodies[: max(1, len(bodies) // 10)]

    async def run() -> float:
        n = len(few)
        queue = saq.Queue.from_url(url, name="bench")
        seen = Seen(n)

        async def noop(ctx: dict[str, Any], *, body: dict[str, Any]) -> None:
            body["n"]  # read it, as every handler here does; the job is counted once marked complete

        async def after(ctx: dict[str, Any]) -> None:
            job = ctx["job"]
            if job.status == saq.Status.COMPLETE:
                seen.add(job.kwargs["body"])

        try:
            await queue.connect()
            await queue.redis.flushall()
            for chunk in chunks(few):
                await asyncio.gather(*(queue.enqueue("noop", body=body) for body in chunk))
            worker = saq.Worker(queue, [("noop", noop)], concurrency=CONCURRENCY, after_process=after)
            t = time.perf_counter()
            # Its stop warns that the upkeep tasks (asleep for up to 60 s) missed the grace period.
            with quiet("saq"):
                async with background("saq worker", worker.start(), worker.stop) as working:
                    await seen.wait(working)
                    rate = n / (time.perf_counter() - t)
            seen.check()
            for kind in ("queued", "active", "incomplete"):
                assert await queue.count(kind) == 0, kind
        finally:
            await within("saq queue.disconnect()", queue.disconnect())
        return rate

    add(bench, url, f"saq: worker, concurrency {CONCURRENCY}{FEW}", run, baseline=raw_list)


def add(bench: Bench, url: str, name: str, fn: Callable[[], Awaitable[float]], *, baseline: str | None = None) -> None:
    bench.case(name, "e2e", guarded(name, url, fn), baseline=baseline)


async def make(args: argparse.Namespace, url: str) -> list[CaseResult]:
    bench = Bench("peers", args)
    bodies = bodies_of(args.messages, args.body_bytes)
    raw_list, raw_stream = raw_cases(bench, url, bodies)
    aioredmq_cases(bench, url, bodies, raw_list, raw_stream)
    faststream_cases(bench, url, bodies, raw_list, raw_stream)
    taskiq_cases(bench, url, bodies, raw_list, raw_stream)
    saq_cases(bench, url, bodies, raw_list)
    peers = ", ".join(f"{d} {version(d)}" for d in ("faststream", "taskiq", "taskiq-redis", "saq"))
    print(f"bench_peers: {peers}", file=sys.stderr)
    return await bench.run()


if __name__ == "__main__":
    main("peers", __doc__, make, messages=20_000)
