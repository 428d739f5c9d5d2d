"""Delivery semantics of the reliable list queue, against a real redis-server."""

from __future__ import annotations

import functools
import signal
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis
from anyio.streams.buffered import BufferedByteReceiveStream

import aioredmq
from aioredmq import Message, RetryPolicy

from .conftest import PYTHON, subprocess_env
from .helpers import lrange_bytes, mq_url, settled_stats, wait_for
from .ledger import report

FAST_RETRY = RetryPolicy(max_deliveries=3, backoff_initial_s=0.01, backoff_max_s=0.05)


async def test_fifo_with_one_consumer(mq: aioredmq.Client) -> None:
    q = mq.queue("fifo")
    sent = [await q.publish({"n": i}) for i in range(20)]
    sent += await q.publish_many({"n": i} for i in range(20, 500))
    got: list[str] = []
    async with q.consume(prefetch=37, block_s=0.2) as consumer:
        async for msg in consumer:
            assert msg.body == {"n": len(got)}
            assert msg.deliveries == 1
            got.append(msg.id)
            await msg.ack()
            if len(got) == len(sent):
                break
    assert got == sent
    await settled_stats(q, ready=0, in_flight=0, dead=0)


async def test_concurrent_publishes_keep_their_call_order(mq: aioredmq.Client) -> None:
    q = mq.queue("order")
    ids: list[str] = []
    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(q.publish, i)
    async with q.consume(prefetch=100, block_s=0.2) as consumer:
        async for msg in consumer:
            ids.append(msg.id)
            await msg.ack()
            if len(ids) == 300:
                break
    assert ids == sorted(ids), "ids are time-ordered and the queue is FIFO"


async def test_consumers_share_the_load_without_duplicates(redis_url: str) -> None:
    n = 3000
    seen: Counter[str] = Counter()
    per_consumer: Counter[int] = Counter()
    async with aioredmq.connect(redis_url) as producer_side:
        sent = await producer_side.queue("shared").publish_many(range(n))

        async def consume(index: int) -> None:
            async with (
                aioredmq.connect(redis_url) as mq,
                mq.queue("shared").consume(prefetch=20, block_s=0.1) as consumer,
            ):
                async for msg in consumer:
                    seen[msg.id] += 1
                    per_consumer[index] += 1
                    await msg.ack()
                    await anyio.lowlevel.checkpoint()  # let the others take a turn
                    if sum(seen.values()) >= n:
                        break

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(consume, i)
                await wait_for(lambda: sum(seen.values()) >= n, 60, "all messages")
                tg.cancel_scope.cancel()
        assert set(seen) == set(sent)
        assert max(seen.values()) == 1, "no message was delivered twice"
        assert len(per_consumer) == 4, per_consumer
        assert min(per_consumer.values()) > 0, per_consumer
        await settled_stats(producer_side.queue("shared"), ready=0, in_flight=0)


@pytest.mark.fault
async def test_poison_message_is_dead_lettered_while_others_flow(mq: aioredmq.Client) -> None:
    q = mq.queue("poison", retry=FAST_RETRY)
    poison = await q.publish({"poison": True})
    good = await q.publish_many({"n": i} for i in range(200))
    handled: set[str] = set()
    poison_deliveries: list[int] = []

    async def handler(msg: Message[Any]) -> None:
        if msg.body.get("poison"):
            poison_deliveries.append(msg.deliveries)
            raise ValueError("boom")
        handled.add(msg.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(mq.run, q, handler)
        await wait_for(lambda: handled == set(good) and len(poison_deliveries) == 3, 20, "good handled, poison x3")
        tg.cancel_scope.cancel()
    assert poison_deliveries == [1, 2, 3]
    await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=1)
    (record,) = await q.dead_letters()
    assert record.envelope is not None
    assert record.envelope.id == poison
    assert "ValueError: boom" in record.reason
    assert "delivered 3 times" in record.reason
    report("a poison message among 200", 201, dead=1, faults="handler raises on one message: dead after 3 deliveries")


@pytest.mark.fault
async def test_garbage_in_ready_goes_to_dead_letter(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("garbage")
    before = await q.publish("before")
    await raw.lpush(q.keys.ready, b"\xff\xfe garbage", b'{"foreign": "writer"}', b"amq1 x 0 1 json 99\n{")
    await raw.lpush(q.keys.ready, q_msg := b"amq1 abc 0 1 msgpack 0\n\x01")  # another codec
    after = await q.publish("after")
    got: list[str] = []
    async with q.consume(prefetch=10, block_s=0.1) as consumer:
        async for msg in consumer:
            got.append(msg.id)
            await msg.ack()
            if len(got) == 2:
                break
    assert got == [before, after]
    stats = await settled_stats(q, ready=0, in_flight=0, dead=4)
    records = await q.dead_letters()
    assert len(records) == stats.dead
    assert {r.raw for r in records} >= {b"\xff\xfe garbage", b'{"foreign": "writer"}', q_msg}
    assert all(r.reason.startswith("undecodable") for r in records)
    assert consumer.stats.dead_lettered == 4
    report("undecodable and foreign entries among good ones", 2, dead=4, faults="4 entries no consumer can decode")


async def test_in_flight_never_exceeds_prefetch_with_a_100k_backlog(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("backlog")
    n, prefetch = 100_000, 64
    await q.publish_many(range(n))
    assert await raw.llen(q.keys.ready) == n
    worst_list = worst_held = 0
    count = 0
    async with q.consume(prefetch=prefetch, block_s=0.1) as consumer:
        inflight = q.keys.inflight(consumer.name)

        async def sample() -> None:
            nonlocal worst_list
            while True:
                worst_list = max(worst_list, await raw.llen(inflight))
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            async for msg in consumer:
                worst_held = max(worst_held, consumer.held)
                await msg.ack()
                count += 1
                if count == n:
                    break
            tg.cancel_scope.cancel()
    assert 0 < worst_list <= prefetch
    assert worst_held == prefetch, "it does fill up to prefetch, and never beyond"
    await settled_stats(q, ready=0, in_flight=0)


@pytest.mark.fault
async def test_handler_slower_than_the_lease_is_not_redelivered(redis_url: str) -> None:
    lease = 0.3
    deliveries: Counter[str] = Counter()
    async with aioredmq.connect(redis_url) as mq:
        q = mq.queue("slow", lease_s=lease)
        sent = await q.publish_many(range(6))

        async def slow(msg: Message[Any]) -> None:
            deliveries[msg.id] += 1
            await anyio.sleep(3 * lease)

        async with anyio.create_task_group() as tg:
            # Two live runners: either would recover the other's messages if a lease lapsed.
            tg.start_soon(functools.partial(mq.run, q, slow, concurrency=3))
            tg.start_soon(functools.partial(mq.run, q, slow, concurrency=3))
            await wait_for(lambda: sum(deliveries.values()) == 6, 10, "6 deliveries")
            await settled_stats(q, ready=0, in_flight=0)
            await anyio.sleep(lease)  # one more lease: a wrongly expired lease would show now
            tg.cancel_scope.cancel()
    assert set(deliveries) == set(sent)
    assert set(deliveries.values()) == {1}
    report("handlers at 3x the lease, two live consumers", 6, faults="handler time 3x the lease: renewed, never robbed")


async def test_close_returns_unstarted_to_the_front_and_unfinished_with_a_raised_count(
    mq: aioredmq.Client,
) -> None:
    q = mq.queue("close")
    sent = await q.publish_many(range(10))
    async with q.consume(prefetch=10, block_s=0.1) as consumer:
        await wait_for(lambda: consumer.held == 10, 5, "a full prefetch")
        first = await consumer.__anext__()
        await first.ack()
        second = await consumer.__anext__()  # handed out, never settled
    stats = await q.stats()
    assert (stats.ready, stats.in_flight, stats.consumers) == (9, 0, {})
    with pytest.raises(aioredmq.MessageStateError):
        await second.ack()
    order: list[tuple[str, int]] = []
    async with q.consume(prefetch=3, block_s=0.1) as consumer:
        async for msg in consumer:
            order.append((msg.id, msg.deliveries))
            await msg.ack()
            if len(order) == 9:
                break
    assert order == [(sent[1], 2)] + [(i, 1) for i in sent[2:]]


async def test_nack_with_delay_waits_then_redelivers(mq: aioredmq.Client) -> None:
    q = mq.queue("nack")
    mid = await q.publish("x")
    async with q.consume(prefetch=5, block_s=0.1) as consumer:
        msg = await consumer.__anext__()
        await msg.nack(delay_s=0.3)
        await settled_stats(q, delayed=1, in_flight=0, ready=0)
        again = await consumer.__anext__()
        assert (again.id, again.deliveries) == (mid, 2)
        await again.nack(delay_s=0)
        third = await consumer.__anext__()
        assert (third.id, third.deliveries) == (mid, 3)
        await third.ack()
    await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)


async def test_nack_after_max_deliveries_dead_letters(mq: aioredmq.Client) -> None:
    q = mq.queue("nackdead", retry=RetryPolicy(max_deliveries=2, backoff_initial_s=0))
    await q.publish("x")
    async with q.consume(prefetch=5, block_s=0.1) as consumer:
        for expected in (1, 2):
            msg = await consumer.__anext__()
            assert msg.deliveries == expected
            await msg.nack(reason="not today")
    (record,) = await q.dead_letters()
    assert record.reason == "not today; delivered 2 times (max_deliveries=2)"


LATE_ACK_CHILD = """
import asyncio, sys, aioredmq
async def main():
    async with aioredmq.connect(sys.argv[1]) as mq:
        q = mq.queue("late", lease_s=0.3)
        async with q.consume(prefetch=1, block_s=0.1, name="stalled") as consumer:
            msg = await consumer.__anext__()
            print("got", msg.id, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await msg.ack()
        print("late", consumer.stats.late_settles, flush=True)
asyncio.run(main())
"""


async def test_late_ack_after_a_lost_lease_is_counted_and_creates_no_duplicate(mq: aioredmq.Client) -> None:
    q = mq.queue("late", lease_s=0.3)
    mid = await q.publish("x")
    child = await anyio.open_process([PYTHON, "-c", LATE_ACK_CHILD, mq_url(mq)], env=subprocess_env())
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        out = BufferedByteReceiveStream(child.stdout)
        with anyio.fail_after(20):
            assert (await out.receive_until(b"\n", 1000)).decode().split() == ["got", mid]
            child.send_signal(signal.SIGSTOP)  # alive but silent: its lease runs out
            async with q.consume(prefetch=1, block_s=0.1, name="rescuer") as rescuer:
                redelivered = await rescuer.__anext__()
                assert (redelivered.id, redelivered.deliveries) == (mid, 2)
                child.send_signal(signal.SIGCONT)
                await child.stdin.send(b"ack now\n")
                assert (await out.receive_until(b"\n", 1000)).decode().split() == ["late", "1"]
                await redelivered.ack()
            assert rescuer.stats.reaped_consumers == 1
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    await settled_stats(q, ready=0, in_flight=0, dead=0)


async def test_restart_with_a_fixed_name_takes_back_its_leftovers(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("restart")
    sent = await q.publish_many(["a", "b", "c"])
    # A previous life of worker-1 took all three and died before acking.
    for _ in sent:
        await raw.lmove(q.keys.ready, q.keys.inflight("worker-1"), "RIGHT", "LEFT")
    async with q.consume(prefetch=5, block_s=0.1, name="worker-1") as consumer:
        got = []
        async for msg in consumer:
            got.append((msg.id, msg.deliveries))
            await msg.ack()
            if len(got) == 3:
                break
    assert got == [(i, 2) for i in sent]


async def test_dead_letters_can_be_listed_requeued_and_purged(mq: aioredmq.Client) -> None:
    q = mq.queue("dead")
    ids = await q.publish_many(range(5))
    async with q.consume(prefetch=5, block_s=0.1) as consumer:
        for _ in ids:
            msg = await consumer.__anext__()
            await msg.dead_letter(f"rejected {msg.body}")
    await settled_stats(q, dead=5, ready=0)
    records = await q.dead_letters(limit=10)
    assert [r.reason for r in records] == [f"rejected {i}" for i in range(5)]
    assert await q.requeue_dead([ids[1], ids[3]]) == 2
    assert await q.purge_dead([ids[0]]) == 1
    stats = await settled_stats(q, dead=2, ready=2)
    async with q.consume(prefetch=5, block_s=0.1) as consumer:
        back = [await consumer.__anext__() for _ in range(stats.ready)]
        for msg in back:
            await msg.ack()
    assert [(m.id, m.deliveries) for m in back] == [(ids[1], 1), (ids[3], 1)]
    assert await q.requeue_dead(limit=1) == 1
    assert await q.purge_dead() == 1
    await settled_stats(q, dead=0, ready=1)


async def test_stats_show_where_messages_are(mq: aioredmq.Client) -> None:
    q = mq.queue("stats", lease_s=5)
    await q.publish_many(range(6))
    async with q.consume(prefetch=2, block_s=0.1, name="c1") as consumer:
        a = await consumer.__anext__()
        b = await consumer.__anext__()
        await a.nack(delay_s=60)
        await b.dead_letter("no")
        c = await consumer.__anext__()
        stats = await settled_stats(q, ready=2, delayed=1, dead=1, in_flight=2)  # c, plus one topped up
        assert set(stats.consumers) == {"c1"}
        assert 0 < stats.consumers["c1"] <= 5
        await c.ack()


async def test_dead_letters_are_managed_a_page_at_a_time(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    from aioredmq.envelope import encode_dead

    q = mq.queue("many-dead")
    ids = await q.publish_many(range(2500))
    envelopes = await lrange_bytes(raw, q.keys.ready)  # newest first
    await raw.delete(q.keys.ready)
    records = [encode_dead(e, "test", 1) for e in reversed(envelopes)]  # oldest first
    garbage = encode_dead(b"\xff never decoded", "test", 1)
    await raw.lpush(q.keys.dead, records[0], garbage, *records[1:])  # dead: newest at the left
    assert await q.requeue_dead(limit=1500) == 1500
    assert await q.requeue_dead(ids[2000:2100]) == 100
    assert await q.requeue_dead() == 900, "the rest; the garbage stays"
    assert (await q.stats()).dead == 1
    assert await q.purge_dead() == 1
    order = [e.decode().split(" ")[1] for e in reversed(await lrange_bytes(raw, q.keys.ready))]
    assert sorted(order) == sorted(ids)
    assert order[:1500] == ids[:1500], "oldest first"


async def test_publish_many_beyond_the_buffer_keeps_order(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("chunks", max_buffered=100)
    ids = await q.publish_many(range(1050))
    assert len(set(ids)) == 1050
    stored = [e.split(b" ")[1].decode() for e in reversed(await lrange_bytes(raw, q.keys.ready))]
    assert stored == ids


async def test_closing_the_client_closes_its_open_consumers_first(redis_url: str, raw: aioredis.Redis) -> None:
    mq = aioredmq.connect(redis_url)
    await mq.__aenter__()
    q = mq.queue("client-close")
    ids = await q.publish_many(range(5))
    consumer = q.consume(prefetch=5, block_s=0.1)
    await consumer.__aenter__()
    await wait_for(lambda: consumer.held == 5, 5, "a full prefetch")
    await mq.aclose()  # the consumer was never closed by its owner
    assert consumer.closed
    assert [e.split(b" ")[1].decode() for e in reversed(await lrange_bytes(raw, q.keys.ready))] == ids
    assert await raw.zcard(q.keys.leases) == 0


async def test_a_move_landing_without_an_error_is_found_by_the_heartbeat(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A move whose reply never came, yet raised nothing (a stalled server answering late),
    leaves a message in the in-flight list that the consumer does not know of."""
    from aioredmq.envelope import encode
    from aioredmq.ids import new_id

    q = mq.queue("stray", lease_s=0.3)
    mid = new_id()
    async with q.consume(block_s=0.1) as consumer:
        # Straight into its in-flight list: no fetch of its own will ever see this one.
        await raw.lpush(q.keys.inflight(consumer.name), encode(mid, 0, 1, "json", None, b'"stray"'))
        with anyio.fail_after(5):
            msg = await consumer.__anext__()
        assert (msg.id, msg.deliveries, msg.body) == (mid, 1, "stray")
        assert consumer.stats.adopted == 1
        await msg.ack()
    await settled_stats(q, ready=0, in_flight=0)


async def test_settles_of_large_messages_go_out_in_bounded_calls(
    mq: aioredmq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioredmq.scripts import Script

    sizes: list[int] = []
    call = Script.__call__

    async def recording(self: Script, redis: aioredis.Redis, keys: Any, args: Any = ()) -> Any:
        if self.name == "settle":
            sizes.append(sum(len(a) for a in args if isinstance(a, bytes)))
        return await call(self, redis, keys, args)

    monkeypatch.setattr(Script, "__call__", recording)
    q = mq.queue("big-settles", max_body_bytes=2 * 1024 * 1024)
    await q.publish_many([b"x".hex() * (600 * 1024)] * 12)  # ~1.2 MB each
    async with q.consume(prefetch=12, block_s=0.1) as consumer:
        held = [await consumer.__anext__() for _ in range(12)]
        for msg in held:  # old and new bytes travel for each: ~29 MB, over the 8 MB bound
            await msg.nack(delay_s=0)
        again = [await consumer.__anext__() for _ in range(12)]
        assert sorted(m.id for m in again) == sorted(m.id for m in held)
        assert {m.deliveries for m in again} == {2}
        for msg in again:
            await msg.ack()
    await settled_stats(q, ready=0, in_flight=0, delayed=0)
    one = 2 * 1_300_000  # a nack carries the held and the new envelope
    assert sum(sizes) > 3 * 8 * 1024 * 1024, "the test does exceed the bound"
    assert max(sizes) <= 8 * 1024 * 1024 + one, "a settle call carried far more than the bound"
