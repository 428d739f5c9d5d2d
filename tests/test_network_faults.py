"""Network faults between aioredmq and a real redis-server, injected by ``tests.proxy.FaultProxy``.

The hard case for a reliable queue is a command that Redis applied but whose reply
never came back: the client sees a broken connection and cannot tell whether anything
happened. These tests let Redis run the command, drop its reply and reset the
connection, then check that the library repairs the situation without losing or
duplicating messages. Each test also checks that the fault really fired on the command
it targets (and that Redis had applied it), so none can pass without the fault.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from importlib import resources

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import aioredmq
from aioredmq.envelope import decode
from aioredmq.scripts import script
from aioredmq.testing import RedisServer

from .helpers import lrange_bytes, settled_stats, stream_entries, wait_for
from .ledger import report
from .proxy import FaultProxy

SCRIPTS = sorted(f.name.removesuffix(".lua") for f in resources.files("aioredmq").joinpath("lua").iterdir())
NIL_REPLIES = (b"$-1\r\n", b"*-1\r\n", b"_\r\n")


def is_error(reply: bytes) -> bool:
    """An error reply (NOSCRIPT, ...): the command did not run, so it is not the fault we want."""
    return reply.startswith(b"-")


def sha(name: str) -> bytes:
    """What an ``EVALSHA`` of the named script carries on the wire."""
    return script(name).sha.encode()


def plain_client(proxy: FaultProxy, socket_timeout_s: float) -> aioredis.Redis:
    """A redis-py client through the proxy that never retries on its own."""
    return aioredis.Redis.from_url(proxy.url, socket_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0))


async def ready_ids(raw: aioredis.Redis, queue: aioredmq.Queue[object]) -> list[str]:
    ids = []
    for env in await raw.lrange(queue.keys.ready, 0, -1):
        assert isinstance(env, bytes)
        ids.append(decode(env).id)
    return ids


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


@pytest.fixture
async def pmq(proxy: FaultProxy, raw: aioredis.Redis) -> AsyncIterator[aioredmq.Client]:
    """The library, connected through the proxy."""
    # Load every script first, so the first EVALSHA through the proxy runs rather than
    # answering NOSCRIPT (the faults skip error replies anyway).
    for name in SCRIPTS:
        await raw.script_load(script(name).source)
    async with aioredmq.connect(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout_s=1.0) as client:
        yield client


# -- the proxy itself ------------------------------------------------------------------


async def test_proxy_forwards_pauses_and_adds_latency(proxy: FaultProxy) -> None:
    client = plain_client(proxy, 5)
    try:
        assert await client.ping()
        proxy.pause()
        assert proxy.paused
        async with anyio.create_task_group() as tg:
            results: list[object] = []

            async def ping() -> None:
                results.append(await client.ping())

            tg.start_soon(ping)
            await anyio.sleep(0.1)
            assert results == []  # held by the proxy, not lost
            proxy.resume()
        assert results == [True]
        proxy.latency_s = 0.01
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert proxy.connections == 1
        assert proxy.forwarded["c2s"] > 0
        assert proxy.forwarded["s2c"] > 0
    finally:
        await client.aclose()


async def test_proxy_drops_replies_and_severs(proxy: FaultProxy, raw: aioredis.Redis) -> None:
    client = plain_client(proxy, 0.3)
    try:
        assert await client.ping()
        proxy.drop_replies = True
        with pytest.raises(rex.TimeoutError):
            await client.set("dropped", "1")
        assert proxy.dropped_bytes > 0
        assert await raw.get("dropped") == b"1"  # it ran; only the reply was lost
        proxy.drop_replies = False

        assert await client.ping()
        assert proxy.sever_all() == 1
        with pytest.raises(rex.ConnectionError):
            await client.ping()
        assert proxy.severed == 1
        assert await client.ping()  # a new connection goes through
    finally:
        await client.aclose()


async def test_proxy_severs_a_connection_held_by_a_pause(proxy: FaultProxy) -> None:
    client = plain_client(proxy, 5)
    try:
        assert await client.ping()
        proxy.pause()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def blocked_ping() -> None:
                    with pytest.raises(rex.ConnectionError):
                        await client.ping()

                tg.start_soon(blocked_ping)
                await wait_for(lambda: proxy.received["c2s"] > proxy.forwarded["c2s"], what="the PING to be held")
                assert proxy.sever_all() == 1
            await wait_for(lambda: proxy.active == 0, what="the pumps of the reset connection to end")
        assert proxy.paused
        proxy.resume()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_proxy_cuts_a_connection_after_n_bytes(proxy: FaultProxy, raw: aioredis.Redis) -> None:
    client = plain_client(proxy, 2)
    try:
        assert await client.ping()
        proxy.cut_after("c2s", 20)  # inside the value of the SET below
        with pytest.raises(rex.ConnectionError):
            await client.set("cut", "x" * 1000)
        assert not proxy.cut_pending
        assert proxy.severed == 1
        assert await raw.exists("cut") == 0  # Redis saw half a command

        proxy.cut_after("s2c", 3)  # inside the reply of the GET below
        with pytest.raises(rex.ConnectionError):
            await client.get("cut")
        assert proxy.severed == 2
    finally:
        await client.aclose()


async def test_proxy_fails_the_reply_of_a_marked_command(proxy: FaultProxy, raw: aioredis.Redis) -> None:
    client = plain_client(proxy, 2)
    try:
        fault = proxy.fail_reply(b"INCR")
        assert await client.get("n") is None  # not marked: goes through
        with pytest.raises(rex.ConnectionError):
            await client.incr("n")
        assert (fault.matched, fault.fired, fault.replies) == (1, 1, [b":1\r\n"])
        assert fault.done.is_set()
        assert await raw.get("n") == b"1"
        assert await client.incr("n") == 2  # disarmed after one shot
    finally:
        await client.aclose()


async def test_proxy_delays_the_reply_of_a_marked_command(proxy: FaultProxy, raw: aioredis.Redis) -> None:
    client = plain_client(proxy, 5)
    try:
        await raw.set("k", "old")
        fault = proxy.delay_reply(b"GET", 0.3)
        async with anyio.create_task_group() as tg:
            got: list[bytes | str | None] = []

            async def get() -> None:
                got.append(await client.get("k"))

            tg.start_soon(get)
            await fault.wait()  # Redis answered; the proxy holds the answer
            assert await raw.set("k", "new")  # another connection goes on meanwhile
        assert got == [b"old"]  # the reply of the command as it ran, delivered late
        assert fault.replies == [b"$3\r\nold\r\n"]
        assert proxy.severed == 0
        assert await client.get("k") == b"new"  # one shot
    finally:
        await client.aclose()


# -- a. publish: a retry after a lost reply does not duplicate ---------------------------


@pytest.mark.fault
async def test_publish_retry_after_a_lost_reply_creates_no_duplicate(
    proxy: FaultProxy, pmq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    queue = pmq.queue("nf-publish", lease_s=1.0)
    publish = sha("publish")
    ids: list[str] = []
    faults = []

    # Single publishes, every third one losing its first reply.
    for i in range(12):
        fault = proxy.fail_reply(publish, keep_reply=is_error) if i % 3 == 0 else None
        ids.append(await queue.publish({"n": i}))
        if fault is not None:
            assert fault.done.is_set()
            assert fault.replies == [b":1\r\n"]  # Redis appended it: the reply said 1
            faults.append(fault)

    # The first reply and the reply to the retry both lost: the third try confirms.
    fault = proxy.fail_reply(publish, times=2, keep_reply=is_error)
    ids.append(await queue.publish({"n": "twice"}))
    assert fault.replies == [b":1\r\n", b":-1\r\n"]  # applied, then recognised as applied
    faults.append(fault)

    # publish_many: one batch of 50, its reply lost.
    fault = proxy.fail_reply(publish, keep_reply=is_error)
    ids += await queue.publish_many([{"m": i} for i in range(50)])
    assert fault.replies == [b":50\r\n"]
    faults.append(fault)

    # Concurrent publishes coalesce into batches; the first batch loses its reply.
    fault = proxy.fail_reply(publish, keep_reply=is_error)
    async with anyio.create_task_group() as tg:

        async def one(n: int) -> None:
            ids.append(await queue.publish({"c": n}))

        for n in range(40):
            tg.start_soon(one, n)
    assert fault.fired == 1
    assert fault.replies[0].startswith(b":")
    assert int(fault.replies[0][1:]) > 0
    faults.append(fault)

    total = 12 + 1 + 50 + 40
    assert sum(f.fired for f in faults) == 4 + 2 + 1 + 1
    assert proxy.severed == 8
    assert len(ids) == total
    assert all(ids)
    assert len(set(ids)) == total
    in_ready = await ready_ids(raw, queue)
    assert len(in_ready) == total, Counter(in_ready).most_common(3)
    assert set(in_ready) == set(ids)
    report("publish replies dropped (single, batch, coalesced; one reply lost twice)", total,
           faults="8 publish replies dropped after Redis applied them")  # fmt: skip


# -- b. fetch: a lost reply to a move is repaired by adoption ----------------------------


async def consume_all(consumer: aioredmq.Consumer[object], expected: set[str], timeout_s: float = 10.0) -> Counter[str]:
    """Ack everything delivered until every expected id was seen; count deliveries per id."""
    seen: Counter[str] = Counter()
    with anyio.fail_after(timeout_s):
        async for msg in consumer:
            seen[msg.id] += 1
            await msg.ack()
            if expected <= seen.keys():
                break
    return seen


async def assert_each_once_and_all_gone(
    queue: aioredmq.Queue[object],
    raw: aioredis.Redis,
    consumer: aioredmq.Consumer[object],
    published: set[str],
    seen: Counter[str],
) -> None:
    """Every published id was delivered once (adoption delivers each orphan once) and acked,
    and nothing is left: no message anywhere, no consumer, no in-flight list."""
    assert set(seen) == published
    assert max(seen.values()) == 1
    assert consumer.stats.acked == len(published)
    stats = await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=0)
    assert stats.consumers == {}
    assert await raw.llen(queue.keys.inflight(consumer.name)) == 0


@pytest.mark.fault
async def test_lost_take_reply_is_repaired_by_adopting_orphans(
    proxy: FaultProxy, pmq: aioredmq.Client, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    published = set(await mq.queue("nf-take").publish_many(list(range(30))))
    queue = pmq.queue("nf-take", lease_s=1.0)
    # The first take moves 10 messages into the in-flight list; its reply never arrives.
    fault = proxy.fail_reply(sha("take"), keep_reply=lambda r: is_error(r) or r == b"*0\r\n")
    async with queue.consume(prefetch=10, block_s=0.2) as consumer:
        seen = await consume_all(consumer, published)
        assert fault.fired == 1
        assert fault.replies[0].startswith(b"*5\r\n"), "a take moves half the prefetch"
        assert consumer.stats.adopted == 5
        assert consumer.stats.connection_errors >= 1
    await assert_each_once_and_all_gone(queue, raw, consumer, published, seen)
    report("the reply to a batch move (take) dropped", len(published), faults="take reply dropped: 10 moved, adopted")


@pytest.mark.fault
async def test_lost_blmove_reply_is_repaired_by_adopting_the_orphan(
    proxy: FaultProxy, pmq: aioredmq.Client, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    producer = mq.queue("nf-blmove")
    queue = pmq.queue("nf-blmove", lease_s=1.0)
    # Empty replies (the wait timed out) pass; the first move that carries a message is lost.
    fault = proxy.fail_reply(b"BLMOVE", keep_reply=lambda r: is_error(r) or r in NIL_REPLIES)
    async with queue.consume(prefetch=10, block_s=2.0) as consumer:
        # Publish only once the consumer waits in BLMOVE, so the wait (not take) gets it.
        await wait_for(lambda: fault.matched > 0, what="the consumer to block in BLMOVE")
        published = {await producer.publish("first")}
        await fault.wait()
        published |= set(await producer.publish_many(list(range(20))))
        seen = await consume_all(consumer, published)
        assert fault.fired == 1
        assert fault.replies[0].startswith(b"$")  # a bulk reply: the message had moved
        assert consumer.stats.adopted == 1
    await assert_each_once_and_all_gone(queue, raw, consumer, published, seen)
    report("the reply to a blocking move (BLMOVE) dropped", len(published), faults="BLMOVE reply dropped: adopted")


# -- c. settle: a lost reply to an ack ---------------------------------------------------


@pytest.mark.fault
async def test_lost_ack_reply_leaves_nothing_behind(
    proxy: FaultProxy, pmq: aioredmq.Client, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    published = set(await mq.queue("nf-ack").publish_many(list(range(30))))
    queue = pmq.queue("nf-ack", lease_s=1.0)
    fault = proxy.fail_reply(sha("settle"), keep_reply=is_error)
    async with queue.consume(prefetch=10, block_s=0.2) as consumer:
        seen = await consume_all(consumer, published)
        assert fault.fired == 1
    # The messages the lost call settled: their ids are in its request, whatever the encoding.
    lost_batch = {msg_id for msg_id in published if msg_id.encode() in fault.requests[0]}
    assert lost_batch
    assert fault.replies == [b"*0\r\n"]  # Redis settled all of them: none was late then
    # The resend found them settled already; they were not delivered again. Counted as
    # resent, not as late: no lease was lost, and no late-settle warning says otherwise.
    assert consumer.stats.resent_settles == len(lost_batch)
    assert consumer.stats.late_settles == 0
    assert set(seen) == published
    duplicates = {msg_id: n - 1 for msg_id, n in seen.items() if n > 1}
    assert set(duplicates) <= lost_batch
    assert sum(duplicates.values()) <= len(lost_batch)
    assert consumer.stats.acked == sum(seen.values())
    stats = await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=0)
    assert stats.consumers == {}
    assert await raw.llen(queue.keys.inflight(consumer.name)) == 0
    report("the reply to an ack batch dropped", len(published), duplicated=sum(duplicates.values()),
           faults=f"ack reply dropped ({len(lost_batch)} acks resent, found done)")  # fmt: skip


async def test_an_ack_settled_while_adopting_is_not_delivered_again(
    proxy: FaultProxy, pmq: aioredmq.Client, mq: aioredmq.Client
) -> None:
    """The adoption listing can predate an ack whose reply comes back first: not an orphan."""
    await mq.queue("race").publish_many(list(range(30)))
    queue = pmq.queue("race", lease_s=5.0)
    async with queue.consume(prefetch=20, block_s=0.2, name="racer") as consumer:
        first = [await consumer.__anext__() for _ in range(20)]
        take = proxy.fail_reply(sha("take"), keep_reply=lambda r: is_error(r) or r == b"*0\r\n")
        lrange = proxy.delay_reply(b"LRANGE", 0.5)  # the listing runs at once, its reply is late
        await first[0].ack()  # room for one more: the next take loses its reply
        await take.wait()
        await wait_for(lambda: lrange.matched > 0, what="the adoption LRANGE")
        await anyio.sleep(0.05)  # it has run in Redis
        await first[1].ack()  # settled before the LRANGE reply arrives
        await lrange.wait()
        await wait_for(lambda: consumer.stats.adopted > 0, what="adoption")
        assert consumer.stats.adopted == 1, "only the message of the lost take reply"
        again = [await consumer.__anext__() for _ in range(consumer.stats.adopted)]
        assert first[1].id not in {m.id for m in again}
        for m in [*first[2:], *again]:
            await m.ack()
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight) == (30 - len(first) - len(again), 0)


async def test_a_full_producer_buffer_makes_publish_wait_and_loses_nothing(
    proxy: FaultProxy, pmq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    queue = pmq.queue("bounded", max_buffered=10)
    await queue.publish("warm-up")  # opens the pooled connection before the stall
    proxy.pause()  # Redis stops answering: the first batch stays in flight
    done: list[str] = []

    async def one(i: int) -> None:
        done.append(await queue.publish(i))

    async with anyio.create_task_group() as tg:
        for i in range(35):
            tg.start_soon(one, i)
        await wait_for(lambda: queue.producer._buffered == 10, 5, "a full buffer")
        await anyio.sleep(0.2)
        assert queue.producer._buffered == 10, "the buffer never holds more than max_buffered"
        assert done == []
        proxy.resume()
    assert len(done) == 35
    assert await raw.llen(queue.keys.ready) == 36


async def test_a_cancelled_publish_is_still_sent(proxy: FaultProxy, pmq: aioredmq.Client, raw: aioredis.Redis) -> None:
    queue = pmq.queue("cancelled-publish")
    await queue.publish("warm-up")
    proxy.pause()  # the next batch waits in flight
    with anyio.move_on_after(0.3) as scope:
        await queue.publish("cancelled while waiting")
    assert scope.cancelled_caught
    proxy.resume()
    await pmq.aclose()  # closing flushes the producer
    bodies = [decode(e).body for e in reversed(await lrange_bytes(raw, queue.keys.ready))]
    assert bodies == [b'"warm-up"', b'"cancelled while waiting"']


# -- streams: lost replies to a read, a publish and an ack --------------------------------


async def test_stream_survives_lost_read_publish_and_ack_replies(
    proxy: FaultProxy, pmq: aioredmq.Client, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A lost XREADGROUP reply is repaired by adopting what the read handed us; a resent
    publish batch is applied once; a resent ack finds nothing left to do."""
    stream = pmq.stream("nf-stream", lease_s=1.0)
    await stream.create_group("g", "begin")
    read = proxy.fail_reply(b"XREADGROUP", keep_reply=lambda r: is_error(r) or r in NIL_REPLIES)
    published: set[str] = set()
    seen: dict[str, int] = {}
    async with stream.consume("g", prefetch=10, block_s=2.0) as consumer:
        await wait_for(lambda: read.matched > 0, what="the consumer to block in XREADGROUP")
        published.add(await mq.stream("nf-stream").publish("first"))
        await read.wait()
        write = proxy.fail_reply(sha("xpublish"), keep_reply=is_error)
        published |= set(await stream.publish_many(list(range(20))))
        assert write.replies == [b"*2\r\n:20\r\n:0\r\n"]  # applied; the resend was dropped
        ack = proxy.fail_reply(sha("xsettle"), keep_reply=is_error)
        with anyio.fail_after(15):
            async for msg in consumer:
                seen[msg.id] = seen.get(msg.id, 0) + 1
                await msg.ack()
                if published <= seen.keys():
                    break
        await ack.wait()
        assert consumer.stats.adopted == 1
    # The resent ack found its entries acked already: counted as resent, as for queues.
    lost_acks = [e for e, _ in await stream_entries(raw, stream.keys.stream) if e.encode() in ack.requests[0]]
    assert lost_acks
    assert consumer.stats.resent_settles == len(lost_acks)
    assert consumer.stats.late_settles == 0
    assert seen.keys() == published
    assert set(seen.values()) == {1}, f"delivered twice: {seen}"
    assert await raw.xlen(stream.keys.stream) == 21
    assert (await stream.stats()).groups["g"].pending == 0
