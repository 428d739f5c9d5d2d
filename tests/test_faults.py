"""Fault scenarios checked by the ledger (tests/ledger.py): real faults, a real redis-server.

Time is compressed (leases of 0.4-1 s) so each scenario runs in seconds. Every scenario
ends with the ledger's check: no confirmed message lost, nothing unexpected, nothing both
handled and dead, duplicates only where the injected fault explains them, and nothing
un-handled left in Redis. The figures print at the end of the session.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioredmq
from aioredmq.envelope import decode_dead, encode
from aioredmq.ids import new_id
from aioredmq.testing import RedisServer

from .helpers import lrange_bytes, wait_for
from .ledger import REPORTS, Ledger, Report, held_ids
from .proxy import Direction, FaultProxy
from .test_crash import _output, poll, wait_exit, worker_process
from .workers import DONE

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]


async def _run_until_drained(
    mq: aioredmq.Client,
    source: aioredmq.Queue[Any],
    ledger: Ledger,
    *,
    timeout_s: float = 20,
    concurrency: int = 8,
) -> None:
    """Run a consumer that records into the ledger until every confirmed message is handled."""

    async def handler(msg: aioredmq.Message[Any]) -> None:
        ledger.done(msg.body["n"], msg.deliveries)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(source, handler, concurrency=concurrency, prefetch=50))
        await poll(ledger.drained(source), timeout_s, "a full drain")
        tg.cancel_scope.cancel()


# -- 1. a consumer process killed with SIGKILL, 5 times -----------------------------------


async def test_a_consumer_killed_five_times_at_random_points_loses_nothing(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    ledger = Ledger("consumer process SIGKILLed 5 times at random points")
    queue = mq.queue("f-kill", lease_s=0.4)
    n = 1500
    await queue.publish_many([{"n": i} for i in range(n)])
    ledger.published(range(n))
    options = ("--lease-s", "0.4", "--concurrency", "8", "--prefetch", "40")
    rng = random.Random(6)
    for kill in range(5):
        run = tmp_path / f"worker-{kill}"
        run.mkdir()
        target = await raw.llen(DONE) + rng.randint(20, 150)
        async with worker_process(run, redis_url, "tests.workers:ledger_handler", "f-kill", *options) as proc:
            await poll(partial(_done_at_least, raw, target), 30, f"worker {kill} to handle more\n{_output(run)}")
            ledger.fault("SIGKILL", timed=kill == 4)
            proc.send_signal(signal.SIGKILL)
            assert await wait_exit(proc, 10, run) == -signal.SIGKILL
    ledger.done_records(await lrange_bytes(raw, DONE))
    await _run_until_drained(mq, queue, ledger)
    report = await ledger.check(raw, queue, duplicates_explained=True)
    assert report.recovery_s is not None, "the last kill left nothing held: it proved nothing"


async def _done_at_least(raw: aioredis.Redis, n: int) -> bool:
    return bool(await raw.llen(DONE) >= n)


# -- 4. redis-server killed and restarted under load ---------------------------------------


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_redis_killed_and_restarted_under_load_keeps_every_confirmed_publish(fsync: str) -> None:
    ledger = Ledger(f"redis-server SIGKILLed and restarted under load, AOF fsync {fsync}")
    with RedisServer("--appendonly", "yes", "--appendfsync", fsync) as server:
        async with aioredmq.connect(server.url, socket_timeout_s=2.0) as mq:
            queue = mq.queue("f-aof", lease_s=1.0)
            stop = anyio.Event()
            next_n = 0
            after_restart: int | None = None  # the first number published after the restart
            killed_at = 0.0

            async def produce() -> None:
                nonlocal next_n
                while not stop.is_set():
                    batch = range(next_n, next_n + 25)
                    next_n += 25
                    try:
                        await queue.publish_many([{"n": i} for i in batch])
                    except aioredmq.AioredmqError:
                        ledger.maybe_published(batch)
                    else:
                        ledger.published(batch)
                    await anyio.sleep(0.005)

            async def handler(msg: aioredmq.Message[Any]) -> None:
                n = msg.body["n"]
                ledger.done(n, msg.deliveries)
                if after_restart is not None and n >= after_restart and ledger.recovery_s is None:
                    ledger.recovery_s = time.monotonic() - killed_at  # a message sent after the restart ran

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(queue, handler, concurrency=8, prefetch=50))
                tg.start_soon(produce)
                await wait_for(lambda: len(ledger.handled) > 300, 20, "load before the kill")
                handled_before = len(ledger.handled)
                server.kill()
                killed_at = time.monotonic()
                ledger.fault("redis-server SIGKILL, restart after 0.3 s")
                await anyio.sleep(0.3)
                server.start()
                after_restart = next_n
                await wait_for(lambda: len(ledger.handled) > handled_before + 300, 30, "load after the restart")
                stop.set()
                await poll(ledger.drained(queue), 30, "a full drain")
                tg.cancel_scope.cancel()
            # The library came back on its own: scripts reloaded, connections remade.
            async with aioredis.Redis.from_url(server.url) as raw:
                await ledger.check(raw, queue, duplicates_explained=True)
                assert await raw.llen(queue.keys.dead) == 0


# -- 5. a torn AOF tail ---------------------------------------------------------------------


async def test_a_torn_aof_tail_loses_only_the_torn_write_and_adds_nothing() -> None:
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        async with aioredmq.connect(server.url) as mq:
            queue = mq.queue("f-torn")
            batches = [list(range(b * 50, b * 50 + 50)) for b in range(10)]
            for batch in batches:
                await queue.publish_many([{"n": i} for i in batch])
        server.kill()
        _tear_tail(server.dir, 7)  # the last write, cut mid-way
        server.start()
        assert "aof-load-truncated" in server.log_tail() or "truncated" in server.log_tail().lower()
        async with aioredis.Redis.from_url(server.url) as raw:
            present = {int(i) for i in await held_ids(raw, queue, "default")}
    everything = {i for batch in batches for i in batch}
    assert present <= everything, f"phantom messages after the restart: {sorted(present - everything)[:5]}"
    lost = everything - present
    assert lost in (set(), set(batches[-1])), f"lost more than the torn last write: {sorted(lost)[:10]}"
    REPORTS.append(Report("AOF tail torn (last 7 bytes cut) before restart", 500, len(lost), 0, 0, None,
                          "only the last batch's write was torn; it is all or nothing"))  # fmt: skip


def _tear_tail(data_dir: str, nbytes: int) -> None:
    """Cut the last ``nbytes`` of the append-only file, as a crash mid-write leaves it."""
    (aof,) = glob.glob(os.path.join(data_dir, "appendonlydir", "*.incr.aof"))
    os.truncate(aof, os.path.getsize(aof) - nbytes)


# -- 6. the connection severed in the middle of a publish -------------------------------------


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
async def test_a_connection_severed_mid_publish_neither_duplicates_nor_loses(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_server: RedisServer, direction: Direction
) -> None:
    """c2s: Redis gets half a request and runs nothing; s2c: it ran the batch and half the
    reply is lost. Either way the resend leaves each message exactly once."""
    what = "request" if direction == "c2s" else "reply"
    ledger = Ledger(f"connection reset in the middle of a publish's {what}")
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy, aioredmq.connect(proxy.url) as pmq:
        queue = pmq.queue("f-sever")
        await queue.publish({"n": -1})  # warm-up: scripts loaded, connection open
        ledger.published([-1])
        # A request of ~120 KB is cut in the middle; a reply (a few bytes) right away.
        proxy.cut_after(direction, 60_000 if direction == "c2s" else 2)
        ledger.fault(f"connection reset mid-{what}")
        await queue.publish_many([{"n": i, "pad": "x" * 40} for i in range(2000)])
        ledger.published(range(2000))
        assert not proxy.cut_pending, "the cut never happened"
        assert await raw.llen(queue.keys.ready) == 2001, "a message was lost or duplicated by the resend"
        await _run_until_drained(mq, mq.queue("f-sever"), ledger)
    await ledger.check(raw, mq.queue("f-sever"))


# -- 8. a partition longer than the lease -------------------------------------------------------


async def test_a_consumer_cut_off_longer_than_its_lease_is_replaced_and_comes_back(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    ledger = Ledger("one consumer cut off for 3x its lease, then healed")
    lease = 0.4
    n = 400
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy, aioredmq.connect(proxy.url) as pmq:
        cut_queue = pmq.queue("f-partition", lease_s=lease)
        queue = mq.queue("f-partition", lease_s=lease)
        await queue.publish_many([{"n": i} for i in range(n)])
        ledger.published(range(n))
        after_heal = 0
        healed = False

        async def handle(msg: aioredmq.Message[Any]) -> None:
            await anyio.sleep(0.01)
            ledger.done(msg.body["n"], msg.deliveries)

        async with cut_queue.consume(prefetch=20, block_s=0.2) as cut_off, anyio.create_task_group() as tg:

            async def run_cut_off() -> None:
                nonlocal after_heal
                async for msg in cut_off:
                    async with msg.process():
                        await handle(msg)
                        after_heal += healed

            tg.start_soon(run_cut_off)
            await wait_for(lambda: len(ledger.handled) >= 40, 10, "the consumer to work before the cut")
            proxy.pause()
            ledger.fault("network partition of one consumer for 3x the lease", timed=True)
            # The other side of the partition: a healthy consumer reclaims what was held.
            tg.start_soon(lambda: mq.run(queue, handle, concurrency=4, prefetch=20))
            await anyio.sleep(3 * lease)
            proxy.resume()
            healed = True
            # It comes back: new messages reach it too.
            await queue.publish_many([{"n": i} for i in range(n, 2 * n)])
            ledger.published(range(n, 2 * n))
            await wait_for(lambda: after_heal > 0, 10, "the healed consumer to handle a message again")
            await poll(ledger.drained(queue), 20, "a full drain")
            await wait_for(lambda: cut_off.stats.late_settles > 0, 5, "the cut-off consumer's late acks")
            tg.cancel_scope.cancel()
    await ledger.check(raw, queue, duplicates_explained=True)


# -- 10. oversize -----------------------------------------------------------------------------------


async def test_oversize_is_refused_by_the_producer_and_dead_lettered_from_a_foreign_writer(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    ledger = Ledger("oversize message: refused on publish, dead-lettered when a foreign writer pushes one")
    queue = mq.queue("f-oversize", max_body_bytes=1024)
    with pytest.raises(aioredmq.MessageTooLargeError, match="max_body_bytes=1024"):
        await queue.publish({"n": -1, "pad": "x" * 2000})
    assert await raw.llen(queue.keys.ready) == 0, "nothing was sent"
    await queue.publish_many([{"n": i} for i in range(20)])
    ledger.published(range(20))
    # A writer that does not check sizes: a well-formed envelope, too big.
    big = encode(new_id(), 0, 1, "json", None, b'{"n": 20, "pad": "' + b"x" * 4000 + b'"}')
    await raw.lpush(queue.keys.ready, big)
    ledger.published([20])
    await queue.publish_many([{"n": i} for i in range(21, 40)])
    ledger.published(range(21, 40))
    await _run_until_drained(mq, queue, ledger)
    (record,) = [decode_dead(r) for r in await lrange_bytes(raw, queue.keys.dead)]
    assert "over max_body_bytes=1024" in record.reason
    assert record.raw == big
    await ledger.check(raw, queue)


# -- 12. redis-server stalled longer than the socket timeout -----------------------------------


async def test_a_stalled_server_absorbs_the_late_write_and_leaves_no_connection_stuck(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aioredmq.producer")
    ledger = Ledger("redis-server stalled (SIGSTOP) for 3x the socket timeout")
    with RedisServer() as server:
        async with aioredmq.connect(server.url, socket_timeout_s=0.3) as mq:
            queue = mq.queue("f-stall", lease_s=2.0)
            await queue.publish_many([{"n": i} for i in range(100)])
            ledger.published(range(100))

            async def handler(msg: aioredmq.Message[Any]) -> None:
                ledger.done(msg.body["n"], msg.deliveries)

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(queue, handler, concurrency=4, prefetch=20))
                await wait_for(lambda: len(ledger.handled) >= 100, 10, "the first 100")
                server.kill(signal.SIGSTOP)
                ledger.fault("SIGSTOP 0.9 s, socket timeout 0.3 s", timed=True, until_any=True)
                # Sent during the stall: the first try times out, then lands when the server
                # wakes; the resend of the same batch is dropped by its sequence number.
                publishing = [queue.publish({"n": i}) for i in range(100, 110)]
                async with anyio.create_task_group() as pubs:
                    for i, coro in enumerate(publishing):
                        pubs.start_soon(_publish_into, ledger, coro, 100 + i)
                    await anyio.sleep(0.9)
                    server.kill(signal.SIGCONT)
                # Every connection works after the stall: a fresh batch goes through and is handled.
                await queue.publish_many([{"n": i} for i in range(110, 200)])
                ledger.published(range(110, 200))
                await poll(ledger.drained(queue), 20, "a full drain after the stall")
                tg.cancel_scope.cancel()
            async with aioredis.Redis.from_url(server.url) as raw:
                await ledger.check(raw, queue)
    # The stall made the producer send its batch more than once; the ledger found each
    # message exactly once, so one copy was dropped by its sequence number. Which copy
    # depends on the order Redis reads its connections when it wakes: the late first try
    # ("already applied" is then logged for the resend) or a resend nobody waits for.
    resends = [r.getMessage() for r in caplog.records if "resending" in r.getMessage()]
    assert resends, "no batch was sent twice: the stall proved nothing"


async def _publish_into(ledger: Ledger, coro: Any, n: int) -> None:
    try:
        await coro
    except aioredmq.AioredmqError:
        ledger.maybe_published([n])
    else:
        ledger.published([n])


# -- bad input: random and mutated bytes --------------------------------------------------------

_ENVELOPE = encode(new_id(), 1, 2, "json", {"trace": "abc"}, b'{"n": "junk"}')


@st.composite
def _junk(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real envelope with one byte changed and maybe its tail cut."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    raw = bytearray(_ENVELOPE)
    raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(1, len(raw)))])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(_junk(), min_size=1, max_size=8))
async def test_random_and_mutated_input_never_stops_a_consumer(
    mq: aioredmq.Client, raw: aioredis.Redis, junk: list[bytes]
) -> None:
    queue = mq.queue(f"f-junk-{new_id()}")
    good = await queue.publish_many([{"n": i} for i in range(3)])
    await raw.lpush(queue.keys.ready, *junk)
    good += await queue.publish_many([{"n": i} for i in range(3, 6)])
    handled: list[str] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        handled.append(msg.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(queue, handler, concurrency=2, prefetch=8))
        await wait_for(lambda: set(good) <= set(handled), 10, "every good message despite the junk")
        await poll(_settled(queue), 10, "the junk to be handled or dead-lettered")
        tg.cancel_scope.cancel()
    assert sorted(i for i in handled if i in good) == sorted(good), "a good message was handled twice"
    stats = await queue.stats()
    # What decoded was handled (a mutated id is still an id); the rest is in dead-letter.
    assert len(handled) - len(good) + stats.dead == len(junk)


def _settled(queue: aioredmq.Queue[Any]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stats = await queue.stats()
        return stats.ready == stats.in_flight == stats.delayed == 0

    return check
