"""Self-healing: the operational Redis events of a real deployment, on a real redis-server.

A master demoted to a replica and promoted back (what a failover does to the old master),
full memory, data lost to a restart without persistence or a FLUSHALL. Each scenario runs
producers and consumers through the event and checks the ledger (tests/ledger.py): no
confirmed message lost, and every loop still running afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

import aioredmq
from aioredmq.testing import RedisServer, free_port

from .helpers import wait_for
from .ledger import Ledger
from .test_crash import poll

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]

Source = aioredmq.Queue[Any] | aioredmq.Stream[Any]
Fault = Callable[[aioredis.Redis], Awaitable[None]]


def source_of(mq: aioredmq.Client, kind: str, name: str, **options: Any) -> Source:
    return mq.queue(name, **options) if kind == "queue" else mq.stream(name, **options)


async def demote_for_a_second(raw: aioredis.Redis) -> None:
    """What a failover does to a master: it becomes a replica (of a master that is not
    there, so it keeps its data and refuses writes), then is promoted again."""
    await raw.execute_command("REPLICAOF", "127.0.0.1", free_port())
    await anyio.sleep(1.0)
    await raw.execute_command("REPLICAOF", "NO", "ONE")


async def run_through(
    ledger: Ledger,
    mq: aioredmq.Client,
    raw: aioredis.Redis,
    source: Source,
    fault: Fault,
    *,
    batch: int = 20,
    losing: bool = False,
) -> None:
    """Publish and consume while ``fault`` runs; then publish more and drain everything.
    ``losing``: the fault loses data, so only what is confirmed after it must arrive."""
    stop = anyio.Event()
    quiet = anyio.Lock()  # held by a fault that must not race a publish
    next_n = 0

    async def produce() -> None:
        while not stop.is_set():
            async with quiet:
                await publish_one_batch()
            await anyio.sleep(0.01)

    async def publish_one_batch() -> None:
        nonlocal next_n
        ns = range(next_n, next_n + batch)
        next_n += batch
        try:
            await source.publish_many([{"n": n} for n in ns])
        except aioredmq.AioredmqError:
            ledger.maybe_published(ns)
        else:
            ledger.published(ns)

    async def handler(msg: aioredmq.Message[Any]) -> None:
        ledger.done(msg.body["n"], msg.deliveries)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(source, handler, concurrency=8))
        tg.start_soon(produce)
        await wait_for(lambda: len(ledger.handled) > 100, 20, "load before the fault")
        if losing:
            async with quiet:
                await fault(raw)
                # What was confirmed before the loss may be gone with it; nothing after.
                ledger.unconfirmed |= ledger.confirmed
                ledger.confirmed.clear()
        else:
            await fault(raw)
        after = len(ledger.handled)
        await wait_for(lambda: len(ledger.handled) > after + 200, 30, "work after the fault")
        stop.set()
        if isinstance(source, aioredmq.Queue):
            await poll(ledger.drained(source), 30, "a full drain")
        else:
            await wait_for(lambda: ledger.confirmed <= set(ledger.handled), 30, "every confirmed entry")
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["queue", "stream"])
async def test_a_master_demoted_for_a_second_loses_nothing_and_nothing_stops(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """READONLY on every write and UNBLOCKED on the blocked read: publishes wait it out
    (none raises), the consumer's loops retry until the master takes writes again."""
    ledger = Ledger(f"{kind}: the master demoted to a replica for 1 s, then promoted")
    with RedisServer() as server, caplog.at_level(logging.WARNING, logger="aioredmq"):
        async with aioredmq.connect(server.url) as mq, aioredis.Redis.from_url(server.url) as raw:
            source = source_of(mq, kind, "h-demote", lease_s=2.0)
            ledger.fault("REPLICAOF a master that is not there for 1 s, then REPLICAOF NO ONE")
            await run_through(ledger, mq, raw, source, demote_for_a_second)
            await ledger.check(raw, source)
    assert not ledger.unconfirmed, "a publish raised during a 1 s demotion"
    assert not any("stopped" in r.getMessage() for r in caplog.records), "a loop stopped for good"


# -- full memory ------------------------------------------------------------------------


async def fill_then_cap(raw: aioredis.Redis, source: Source, ledger: Ledger, n: int) -> None:
    """Publish ``n`` messages of about 1 KB, then cap maxmemory below what Redis uses."""
    pad = "x" * 1000
    for start in range(0, n, 1000):
        ns = range(start, min(n, start + 1000))
        await source.publish_many([{"n": i, "pad": pad} for i in ns])
        ledger.published(ns)
    used = int((await raw.info("memory"))["used_memory"])
    await raw.config_set("maxmemory", str(used - 2_000_000))


@pytest.mark.parametrize("kind", ["queue", "stream"])
async def test_a_full_redis_refuses_publishes_by_name_and_its_consumers_drain_it(kind: str) -> None:
    """maxmemory with noeviction, and Redis over it: a publish raises OutOfMemoryError and
    writes nothing; consumers still take, renew their leases and ack, which frees memory."""
    ledger = Ledger(f"{kind}: Redis over maxmemory (noeviction) holding 12,600 messages")
    n = 12_600
    with RedisServer("--maxmemory-policy", "noeviction") as server:
        async with aioredmq.connect(server.url) as mq, aioredis.Redis.from_url(server.url) as raw:
            source = source_of(mq, kind, "h-full", lease_s=1.5)
            if isinstance(source, aioredmq.Stream):
                await source.create_group("default")
            await fill_then_cap(raw, source, ledger, n)
            ledger.fault("maxmemory set 2 MB below the memory in use")
            before = await raw.dbsize(), int((await raw.info("memory"))["used_memory"])
            with pytest.raises(aioredmq.OutOfMemoryError, match="nothing was queued"):
                await source.publish({"n": -1})
            with pytest.raises(aioredmq.OutOfMemoryError):
                await source.publish_many([{"n": -2}, {"n": -3}])
            assert isinstance(aioredmq.OutOfMemoryError("x"), aioredmq.PublishError)
            assert (await raw.dbsize(), int((await raw.info("memory"))["used_memory"]))[0] == before[0]

            async def handler(msg: aioredmq.Message[Any]) -> None:
                ledger.done(msg.body["n"], msg.deliveries)

            with anyio.move_on_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: mq.run(source, handler, concurrency=16))
                    await wait_for(lambda: len(ledger.handled) >= n, 50, "a full drain")
                    if isinstance(source, aioredmq.Queue):
                        await poll(ledger.drained(source), 10, "nothing held")
                    tg.cancel_scope.cancel()
            assert len(ledger.handled) == n, f"drained {len(ledger.handled)} of {n} over maxmemory"
            if isinstance(source, aioredmq.Stream):
                await raw.xtrim(source.keys.stream, maxlen=0)  # what retention would do
            await source.publish({"n": n})  # memory is back under the cap: publishes work again
            ledger.published([n])
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(source, handler, concurrency=4))
                await wait_for(lambda: str(n) in ledger.handled, 10, "the publish after the drain")
                tg.cancel_scope.cancel()
            await ledger.check(raw, source)


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_connect_warns_once_when_redis_may_evict_queue_keys(
    policy: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer("--maxmemory-policy", policy) as server, caplog.at_level(logging.WARNING, logger="aioredmq"):
        async with aioredmq.connect(server.url) as mq:
            await mq.queue("h-policy").publish({"n": 1})
            await anyio.sleep(0.2)
    said = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert said == (
        [
            f"Redis has maxmemory-policy {policy}: once full, it deletes keys, and messages with them. "
            "Set maxmemory-policy noeviction on the Redis that holds queues."
        ]
        if warned
        else []
    )


# -- data loss --------------------------------------------------------------------------


async def flushall(raw: aioredis.Redis) -> None:
    await raw.flushall()


async def restart_without_persistence(server: RedisServer) -> Fault:
    async def restart(raw: aioredis.Redis) -> None:
        server.kill()
        await anyio.sleep(0.3)
        server.start()

    return restart


@pytest.mark.parametrize("kind", ["queue", "stream"])
@pytest.mark.parametrize("event", ["flushall", "restart"])
async def test_after_data_loss_every_publish_confirmed_since_is_delivered(
    kind: str, event: str, caplog: pytest.LogCaptureFixture
) -> None:
    """FLUSHALL, or a restart of a Redis without persistence, under running consumers: a
    stream's group is gone (NOGROUP; UNBLOCKED for a blocked read) while publishes
    recreate the stream without it. The consumer creates its group again from the start
    of what the stream now holds, so nothing confirmed after the loss is skipped."""
    what = "FLUSHALL" if event == "flushall" else "redis-server SIGKILLed, restarted empty (no persistence)"
    ledger = Ledger(f"{kind}: data lost under running consumers ({what})")
    with RedisServer("--save", "", "--appendonly", "no") as server, caplog.at_level(logging.WARNING, "aioredmq"):
        async with aioredmq.connect(server.url, socket_timeout_s=2.0) as mq, aioredis.Redis.from_url(server.url) as raw:
            source = source_of(mq, kind, "h-lost", lease_s=1.5)
            fault = flushall if event == "flushall" else await restart_without_persistence(server)
            ledger.fault(what)
            await run_through(ledger, mq, raw, source, fault, losing=True)
            await ledger.check(raw, source)
    assert len(ledger.confirmed) >= 200
    if kind == "stream":
        assert any("created it again" in r.getMessage() for r in caplog.records)
    assert not any("stopped" in r.getMessage() for r in caplog.records), "a loop stopped for good"


# -- opening while Redis is down, busy, or has dropped idle connections -----------------


async def test_a_service_started_before_redis_consumes_once_redis_is_up() -> None:
    """The FastAPI lifespan / aiohttp set-up start the service with the app, Redis or not:
    its runner waits for Redis (health says "starting"), then consumes."""
    port = free_port()
    handled: list[Any] = []

    async def keep(msg: aioredmq.Message[Any]) -> None:
        handled.append(msg.body)

    service = aioredmq.Service(f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.5)
    service.add(lambda mq: mq.queue("h-late"), keep)
    await service.start()
    try:
        await anyio.sleep(1.5)
        assert [r.state for r in service.health().runners] == ["starting"]
        assert not service.ready
        with RedisServer(port=port):
            await wait_for(lambda: service.ready, 15, "the runner open once Redis is up")
            await service.client.queue("h-late").publish({"n": 1})
            await wait_for(lambda: handled == [{"n": 1}], 10, "the message handled")
            report_open("a service started 1.5 s before redis-server", 1, "Redis down at start")
    finally:
        await service.stop()


@pytest.mark.parametrize("kind", ["queue", "stream", "partitioned"])
async def test_opening_a_consumer_waits_out_idle_dropped_connections_and_a_busy_script(kind: str) -> None:
    """The first heartbeat, XGROUP CREATE or partition balance met a pooled connection that
    Redis closed while idle (its `timeout`), or BUSY from a long script, and raised."""
    with RedisServer("--timeout", "1", "--lua-time-limit", "50") as server:
        async with aioredmq.connect(server.url) as mq:
            source = mq.partitioned("h-open", partitions=2) if kind == "partitioned" else source_of(mq, kind, "h-open")
            if isinstance(source, aioredmq.Stream):
                await source.create_group("default")
            await source.publish({"n": 1}, **({"key": "k"} if kind == "partitioned" else {}))
            await anyio.sleep(2.2)  # Redis closes the pool's idle connections
            async with anyio.create_task_group() as tg, aioredis.Redis.from_url(server.url) as raw:
                busy = "local t = tonumber(redis.call('TIME')[1]) + 2 "
                busy += "while tonumber(redis.call('TIME')[1]) < t do end return 1"
                tg.start_soon(_ignoring_its_reply, raw.eval(busy, 0))  # Redis may drop it: idle 2 s
                await anyio.sleep(0.3)  # the script runs: Redis answers BUSY
                with anyio.fail_after(20):
                    async with source.consume() as consumer:  # type: ignore[union-attr]
                        msg = await anext(consumer)
                        await msg.ack()
            assert msg.body == {"n": 1}


async def test_a_worker_started_before_redis_waits_for_it_and_then_consumes(tmp_path: Any) -> None:
    from .test_crash import _output, worker_process
    from .workers import DONE

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    async with worker_process(tmp_path, url, "tests.workers:ledger_handler", "h-worker") as proc:
        await anyio.sleep(2.0)
        assert proc.returncode is None, f"the worker exited while Redis was down\n{_output(tmp_path)}"
        with RedisServer(port=port):
            async with aioredmq.connect(url) as mq, aioredis.Redis.from_url(url) as raw:
                await mq.queue("h-worker").publish({"n": 7})
                await poll(lambda: _has(raw, DONE, b"7 1"), 20, "the worker's handling")
        assert "waiting for Redis" in _output(tmp_path)


async def _ignoring_its_reply(command: Awaitable[Any]) -> None:
    with contextlib.suppress(rex.ConnectionError):
        await command


async def _has(raw: aioredis.Redis, key: str, item: bytes) -> bool:
    return item in await raw.lrange(key, 0, -1)


def report_open(scenario: str, messages: int, faults: str) -> None:
    from .ledger import report

    report(scenario, messages, faults=faults)


# -- partition hand-over ----------------------------------------------------------------


def key_in(partition: int, of: int) -> str:
    return next(k for i in range(1000) if zlib.crc32((k := f"key-{i}").encode()) % of == partition)


async def test_a_hand_over_that_meets_a_demoted_master_does_not_end_the_member() -> None:
    """A member hands a partition over to a newcomer once its running handler ends; the
    release met READONLY (the master demoted meanwhile) and the member's iteration raised.
    It now releases at its next balance, and both members go on consuming."""
    with RedisServer() as server:
        async with aioredmq.connect(server.url) as mq, aioredis.Redis.from_url(server.url) as raw:
            pq = mq.partitioned("h-hand", partitions=2, lease_s=4.0)
            k0, k1 = key_in(0, 2), key_in(1, 2)
            await pq.publish_many([(k1, {"n": i}) for i in range(5)])
            handled: list[int] = []
            async with pq.consume(name="a", close_timeout_s=0.3) as a:
                first = await anext(a)  # partition 1's handler runs: the hand-over waits for it
                async with pq.consume(name="b") as b:
                    await wait_for(lambda: 1 in a._leaving, 10, "member a handing partition 1 over")
                    await raw.execute_command("REPLICAOF", "127.0.0.1", free_port())
                    await first.ack()  # the hand-over goes on, into READONLY
                    handled.append(first.body["n"])
                    await anyio.sleep(2.0)
                    await raw.execute_command("REPLICAOF", "NO", "ONE")
                    await pq.publish({"n": 100}, key=k0)

                    async def drain(member: aioredmq.PartitionedConsumer[Any]) -> None:
                        async for msg in member:
                            handled.append(msg.body["n"])
                            await msg.ack()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(drain, a)
                        tg.start_soon(drain, b)
                        await wait_for(lambda: set(handled) >= {0, 1, 2, 3, 4, 100}, 20, "every message")
                        tg.cancel_scope.cancel()
                    await wait_for(lambda: (a.held_partitions, b.held_partitions) == ([0], [1]), 10, "one each")
    from .ledger import report

    report("partitioned: a hand-over released into a demoted master", 6, faults="REPLICAOF for 2 s mid-hand-over")


# -- bounds: the pool, one script call ------------------------------------------------------


async def test_more_handlers_than_pooled_connections_wait_for_one_and_fail_nothing() -> None:
    """redis-py's plain asyncio pool raises past max_connections ("Too many connections"):
    with idempotency, 128 handlers and 16 connections, healthy messages were dead-lettered
    by a processed-id check that never reached Redis."""
    ledger = Ledger("128 handlers over a pool of 16 connections, with the idempotency helper")
    with RedisServer() as server:
        async with aioredmq.connect(server.url, max_connections=16) as mq, aioredis.Redis.from_url(server.url) as raw:
            queue = mq.queue("h-pool", lease_s=2.0)
            await queue.publish_many([{"n": n} for n in range(2000)])
            ledger.published(range(2000))
            once = aioredmq.Idempotency()

            async def handler(msg: aioredmq.Message[Any]) -> None:
                await once.apply(msg, ("INCR", "h-pool:{h-pool}:count"))
                ledger.done(msg.body["n"], msg.deliveries)

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(queue, handler, concurrency=128, idempotency=once))
                await poll(ledger.drained(queue), 60, "a full drain")
                tg.cancel_scope.cancel()
            await ledger.check(raw, queue)
            assert await raw.get("h-pool:{h-pool}:count") == b"2000"
            assert (await queue.stats()).dead == 0


async def test_handlers_holding_every_pooled_connection_never_delay_a_lease_renewal() -> None:
    """Heartbeats shared the pool with the handlers: with both connections of a pool of 2
    held by handlers' slow commands and 30 more handlers waiting for one, a renewal waited
    behind them all, and the lease of a live consumer lapsed (another would reap it)."""
    with RedisServer() as server:
        async with aioredmq.connect(server.url, max_connections=2) as mq, aioredis.Redis.from_url(server.url) as raw:
            queue = mq.queue("h-starve", lease_s=0.9)
            await queue.publish_many([{"n": n} for n in range(200)])
            checks: list[bool] = []

            async def handler(msg: aioredmq.Message[Any]) -> None:
                await mq.redis.blpop(["h-starve-nothing"], timeout=0.5)  # holds a connection 0.5 s

            async def watch_lease() -> None:
                while True:
                    score = await raw.zscore(queue.keys.leases, "worker")
                    s, us = await raw.time()
                    checks.append(score is not None and score >= s * 1000 + us // 1000)
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: mq.run(queue, handler, concurrency=32, name="worker", grace_s=0.2))

                async def leased() -> bool:
                    return await raw.zscore(queue.keys.leases, "worker") is not None

                await poll(leased, 5, "the consumer open")
                tg.start_soon(watch_lease)
                await anyio.sleep(3.0)
                tg.cancel_scope.cancel()
            assert len(checks) > 20
            assert all(checks), f"the live consumer's lease lapsed in {checks.count(False)} of {len(checks)} looks"


async def test_apply_refuses_a_command_too_large_for_one_call_before_anything_runs(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A 9,000-member SADD failed inside the script after the INCR before it had run, and
    without the marker: the redelivery ran the INCR again."""
    queue = mq.queue("h-apply")
    await queue.publish({"n": 1})
    once = aioredmq.Idempotency()
    async with queue.consume() as consumer:
        msg = await anext(consumer)
        with pytest.raises(aioredmq.ConfigError, match="9000 arguments"):
            await once.apply(msg, ("INCR", "c:{h-apply}"), ("SADD", "s:{h-apply}", *map(str, range(9000))))
        assert await raw.get("c:{h-apply}") is None
        # The script checks too, for a caller that goes around the check.
        from aioredmq.scripts import script

        keys = (queue.keys.done, "c:{h-apply}", "s:{h-apply}")
        with pytest.raises(aioredmq.ResponseError, match="at most 7900"):
            await script("apply_once")(mq.redis, keys, [msg.id, 1000, 0, "INCR", 9000, "SADD", *range(9000)])
        assert await raw.get("c:{h-apply}") is None
        assert await once.apply(msg, ("INCR", "c:{h-apply}"), ("SADD", "s:{h-apply}", *map(str, range(7900))))
        assert await raw.get("c:{h-apply}") == b"1"
        assert await raw.scard("s:{h-apply}") == 7900
        await msg.ack()


async def test_cancelled_handlers_leave_no_trace_in_a_long_lived_stream_consumer(mq: aioredmq.Client) -> None:
    """Every handler cancelled added its entry id to a set kept for the consumer's life."""
    stream = mq.stream("h-released", lease_s=0.3)
    await stream.create_group("g")
    await stream.publish_many([{"n": n} for n in range(601)])

    async def give_back(consumer: aioredmq.StreamConsumer[Any]) -> None:
        msg = await anext(consumer)
        with anyio.CancelScope() as scope:
            async with msg.process():  # a cancelled handler: its message is given back
                scope.cancel()
                await anyio.sleep(1)

    async with stream.consume("g", prefetch=50) as consumer:
        for _ in range(600):
            await give_back(consumer)
        assert 0 < len(consumer._released) <= 600
        await anyio.sleep(0.7)  # two leases: every sweep has had them
        await give_back(consumer)
        assert len(consumer._released) == 1, "the ids given back two leases ago are still kept"


async def test_a_plain_publish_never_waits_for_replicas_another_caller_asked_for() -> None:
    """Callers shared a batch that waited for the most replicas any of them asked for: on a
    server with no replica, every replicas=0 publish beside a replicas=1 one raised."""
    with RedisServer() as server:
        async with aioredmq.connect(server.url) as mq:
            queue = mq.queue("h-durability")
            plain_failed = durable_failed = 0

            async def publish(n: int) -> None:
                nonlocal plain_failed, durable_failed
                try:
                    if n % 10 == 0:
                        await queue.publish({"n": n}, replicas=1, replica_timeout_s=0.3)
                    else:
                        await queue.publish({"n": n})
                except aioredmq.NotReplicatedError:
                    if n % 10 == 0:
                        durable_failed += 1
                    else:
                        plain_failed += 1

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for n in range(2000):
                        tg.start_soon(publish, n)
            assert plain_failed == 0
            assert durable_failed == 200  # no replica: each replicas=1 publish says so
            assert (await queue.stats()).ready == 2000


# -- timers: bulk promotion beside lease renewal, a retry's due time ------------------------


_STAGE = """
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local id = string.format('%032x', i)
  redis.call('ZADD', KEYS[1], 0, id)
  redis.call('HSET', KEYS[2], id, 'amq1 ' .. id .. ' 0 0 json 0\\n{"n": -1}')
end
"""


async def schedule_due_now(raw: aioredis.Redis, source: Source, n: int) -> None:
    """``n`` delayed messages, all due already, put in the delayed set at once: written
    aside in slices (no slice stalls Redis near a lease), then renamed into place."""
    keys = source.keys
    staged = (keys.delayed + ":staged", keys.scheduled + ":staged")
    for start in range(1, n + 1, 20_000):
        await raw.eval(_STAGE, 2, *staged, start, min(n, start + 19_999))
    async with raw.pipeline(transaction=True) as pipe:
        pipe.rename(staged[0], keys.delayed)
        pipe.rename(staged[1], keys.scheduled)
        await pipe.execute()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["queue", "stream"])
async def test_a_million_due_messages_never_hold_back_a_lease_renewal(kind: str) -> None:
    """The timer renewed the lease and then moved due messages until none was left: with a
    backlog of a million and a 0.6 s lease, a live consumer lost its lease (a list queue's
    was reaped, a stream's entry claimed by another) while its handler still ran. (Half a
    million for the stream, whose entries cost more to append.)"""
    n = 1_000_000 if kind == "queue" else 500_000
    with RedisServer() as server:
        async with aioredmq.connect(server.url) as mq, aioredis.Redis.from_url(server.url) as raw:
            source = source_of(mq, kind, "h-backlog", lease_s=0.6)
            consume = source.consume if isinstance(source, aioredmq.Queue) else lambda **kw: source.consume("g", **kw)
            if isinstance(source, aioredmq.Stream):
                await source.create_group("g", "begin")
            await source.publish({"n": 0})
            async with consume(name="a", prefetch=1) as a:
                held = await anext(a)  # its handler runs throughout; b opens once a has it
                async with consume(name="b", prefetch=1) as b:
                    await schedule_due_now(raw, source, n)
                    lapsed = []
                    for consumer in (a, b):  # both hear of it, as a due notice would tell them
                        consumer._due.hint(0)
                    with anyio.fail_after(60):
                        while await raw.zcard(source.keys.delayed):
                            if isinstance(source, aioredmq.Queue):
                                deadline = await raw.zscore(source.keys.leases, "a")
                                t = await raw.time()
                                if deadline is None or deadline < t[0] * 1000 + t[1] // 1000:
                                    lapsed.append(deadline)
                            await anyio.sleep(0.05)
                    await held.ack()
                    await anyio.sleep(0.3)
                    assert not lapsed, f"consumer a's lease lapsed while it was alive: {lapsed[:3]}"
                    assert b.stats.reaped_consumers == 0
                    assert b.stats.claimed == 0
                    assert a.stats.late_settles == 0
    from .ledger import report

    report(
        f"{kind}: a million delayed messages due at once, lease 0.6 s", 1, faults="1,000,000 due; live consumer kept"
    )


async def test_a_failed_message_is_retried_after_its_backoff_not_at_the_next_heartbeat(mq: aioredmq.Client) -> None:
    """About one retry in 11 waited for the next heartbeat (lease_s / 3, 10 s here): the
    failure came while the timer's promote call was in flight, and the timer forgot the
    retry's due time when that call found nothing waiting yet."""
    retry = aioredmq.RetryPolicy(backoff_initial_s=0.3, backoff_max_s=0.3, max_deliveries=3)
    queue = mq.queue("h-backoff", retry=retry, lease_s=30.0)
    failed_at: dict[int, float] = {}
    waits: list[float] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        n = msg.body["n"]
        if msg.deliveries == 1:
            failed_at[n] = anyio.current_time()
            raise RuntimeError("first delivery fails")
        waits.append(anyio.current_time() - failed_at[n])

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(queue, handler, concurrency=8))
        for n in range(120):  # spread out, so failures land at every point of the timer's work
            await queue.publish({"n": n})
            await anyio.sleep(0.01)
        await wait_for(lambda: len(waits) == 120, 30, "every retry")
        tg.cancel_scope.cancel()
    assert max(waits) < 0.3 + 1.5, f"a retry waited {max(waits):.1f} s for a 0.3 s backoff"


async def test_one_shot_reads_and_cancel_survive_a_connection_redis_dropped_while_idle() -> None:
    """stats(), peek(), dead_letters() and cancel() failed once on a pooled connection that
    Redis had closed while idle (its `timeout`), then worked. They are safe to send twice,
    and now resend once."""
    with RedisServer("--timeout", "1") as server:
        async with aioredmq.connect(server.url, max_connections=1) as mq:
            queue, stream = mq.queue("h-idle"), mq.stream("h-idle")
            mid = await queue.publish({"n": 1}, delay=60)
            await stream.publish({"n": 1})
            calls: list[Callable[[], Awaitable[object]]] = [
                queue.stats,
                queue.peek,
                queue.dead_letters,
                stream.stats,
                stream.peek,
                lambda: stream.dead_letters("g"),
                lambda: queue.cancel(mid),
            ]
            for call in calls:
                await anyio.sleep(1.6)  # Redis closes the pool's one connection
                await call()
            assert (await queue.stats()).delayed == 0  # the cancel went through


async def test_a_key_of_another_type_fails_the_whole_settle_and_loses_nothing(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A WRONGTYPE part-way through the settle script left a message removed from in
    flight and placed nowhere: the script checks the keys it may write before the first."""
    queue = mq.queue("h-type", retry=aioredmq.RetryPolicy(backoff_initial_s=5))
    await queue.publish({"n": 1})
    async with queue.consume(name="c") as consumer:
        msg = await anext(consumer)
        await raw.delete(queue.keys.delayed)
        await raw.set(queue.keys.delayed, "not a sorted set")
        await msg.nack()  # a retry: to the delayed set, which is now a string
        await anyio.sleep(0.5)  # the settle is refused, and resent
        assert len(await raw.lrange(queue.keys.inflight("c"), 0, -1)) == 1, "taken from in flight, put nowhere"
        await raw.delete(queue.keys.delayed)  # the operator's fix: the resend goes through
        await wait_for(lambda: consumer.held == 0, 10, "the settle applied")
    assert (await queue.stats()).delayed == 1


async def test_closing_open_consumers_while_redis_is_silent_ends_in_time_and_loses_nothing() -> None:
    """Each consumer's close waited its own ``close_timeout_s`` (10 s) twice, one consumer
    after another: minutes for a handful of consumers. Now they close together, by the
    client's deadline; what they could not give back is recovered once their leases expire."""
    import signal
    import time

    with RedisServer() as server:
        mq = aioredmq.connect(server.url, socket_timeout_s=0.5, close_timeout_s=1.0)
        await mq.__aenter__()
        queue = mq.queue("h-closing", lease_s=1.5)
        stream = mq.stream("h-closing-s", lease_s=1.5)
        pq = mq.partitioned("h-closing-p", partitions=2, lease_s=1.5)
        opened = [queue.consume(prefetch=5), queue.consume(prefetch=5), stream.consume("g", start="0"), pq.consume()]
        await queue.publish_many([{"n": n} for n in range(20)])
        await stream.publish_many([{"n": n} for n in range(20)])
        await pq.publish_many([(f"k{n % 4}", {"n": n}) for n in range(20)])
        for consumer in opened:
            await consumer.__aenter__()
        handed = [await c.__anext__() for c in opened]  # one handler each, still running
        await wait_for(lambda: all(c.held for c in opened[:3]), what="every consumer holds messages")
        server.kill(signal.SIGSTOP)
        try:
            began = time.monotonic()
            await mq.aclose()
            took = time.monotonic() - began
        finally:
            server.kill(signal.SIGCONT)
        assert took < 1.0 + 1.0, f"closing {len(opened)} consumers took {took:.1f} s with close_timeout_s=1"
        assert all(c.closed for c in opened)
        assert all(m._settled for m in handed), "close settled every running delivery (given back)"
        async with aioredmq.connect(server.url) as again:
            seen: dict[str, set[int]] = {"queue": set(), "stream": set(), "partitioned": set()}
            sources: list[tuple[str, Any]] = [
                ("queue", again.queue("h-closing", lease_s=1.5).consume()),
                ("stream", again.stream("h-closing-s", lease_s=1.5).consume("g")),
                ("partitioned", again.partitioned("h-closing-p", partitions=2, lease_s=1.5).consume()),
            ]
            async with anyio.create_task_group() as tg:
                for label, consumer in sources:

                    async def drain(label: str = label, consumer: Any = consumer) -> None:
                        async with consumer:
                            async for msg in consumer:
                                seen[label].add(msg.body["n"])
                                await msg.ack()

                    tg.start_soon(drain)
                await wait_for(lambda: all(len(v) == 20 for v in seen.values()), timeout_s=30, what="all recovered")
                tg.cancel_scope.cancel()
        assert all(v == set(range(20)) for v in seen.values()), seen


async def test_closing_while_redis_is_silent_ends_in_time_and_names_what_it_gave_up() -> None:
    """Each buffered batch got up to 18 shielded tries of a full socket timeout: with Redis
    silent, closing took 24 s for two batches at a 0.5 s timeout, minutes at the defaults."""
    import signal
    import time

    with RedisServer() as server:
        mq = aioredmq.connect(server.url, socket_timeout_s=0.5, close_timeout_s=1.0)
        await mq.__aenter__()
        queue = mq.queue("h-close")
        first = await queue.publish({"n": -1})  # connected, script loaded
        server.kill(signal.SIGSTOP)
        outcomes: list[BaseException | None] = []

        async def publish(n: int) -> None:
            try:
                await queue.publish_many([{"n": n}, {"n": n + 1}])
            except aioredmq.PublishUnconfirmedError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)

        try:
            async with anyio.create_task_group() as tg:
                for n in range(0, 40, 2):
                    tg.start_soon(publish, n)
                await anyio.sleep(0.2)  # the first batch is on its way; the rest wait behind it
                began = time.monotonic()
                with pytest.raises(aioredmq.PublishUnconfirmedError) as closing:
                    await mq.aclose()
                took = time.monotonic() - began
        finally:
            server.kill(signal.SIGCONT)
        assert took < 1.0 + 1.0, f"closing took {took:.1f} s with close_timeout_s=1"
        assert len(outcomes) == 20
        assert all(isinstance(o, aioredmq.PublishUnconfirmedError) for o in outcomes)
        gave_up = set(closing.value.ids)
        assert len(gave_up) == 40  # every message, by id
        async with aioredis.Redis.from_url(server.url) as raw:
            from aioredmq.envelope import decode

            queued = [decode(e) for e in await raw.lrange(queue.keys.ready, 0, -1)]
        given_up_but_there = {env.id for env in queued} - {first}
        assert given_up_but_there <= gave_up, "a message is in Redis that the close did not name"
        ns = {json.loads(env.body)["n"] for env in queued if env.id != first}
        assert all(n ^ 1 in ns for n in ns), f"half a batch in Redis: {sorted(ns)}"  # batches are (0, 1), (2, 3)...
