"""The partitioned queue against a real redis-server: per-key order, exclusive partitions,
rebalancing, and order kept across a SIGKILL."""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq

from .helpers import lrange_bytes, wait_for
from .ledger import report
from .test_crash import poll, worker_process
from .workers import ORDER

pytestmark = pytest.mark.timeout(90)


def run_in(
    tg: anyio.abc.TaskGroup, consumer: aioredmq.PartitionedConsumer[Any], handle: Callable[..., Awaitable[None]]
) -> None:
    """Open ``consumer`` and run ``handle(msg)`` with 8 concurrent tasks until cancelled."""

    async def serve() -> None:
        async with consumer, anyio.create_task_group() as inner:
            for _ in range(8):
                inner.start_soon(work)

    async def work() -> None:
        async for msg in consumer:
            async with msg.process():
                await handle(msg)

    tg.start_soon(serve)


async def test_each_key_in_order_different_keys_in_parallel(mq: aioredmq.Client) -> None:
    pq = mq.partitioned("orders", partitions=4)
    items = [(f"k{k}", n) for n in range(30) for k in range(6)]
    await pq.publish_many(items)
    handled: dict[str, list[int]] = defaultdict(list)
    running: dict[str, int] = defaultdict(int)
    overlap_across_keys = 0
    overlap_within_key = 0

    async def handle(msg: aioredmq.Message[Any]) -> None:
        nonlocal overlap_across_keys, overlap_within_key
        key = msg.headers["aioredmq-key"]
        running[key] += 1
        overlap_within_key = max(overlap_within_key, running[key])
        overlap_across_keys = max(overlap_across_keys, sum(1 for v in running.values() if v))
        await anyio.sleep(0.002)
        handled[key].append(msg.body)
        running[key] -= 1

    async with anyio.create_task_group() as tg:
        run_in(tg, pq.consume(), handle)
        await wait_for(lambda: sum(map(len, handled.values())) == len(items), what="every message")
        tg.cancel_scope.cancel()
    assert all(seq == list(range(30)) for seq in handled.values()), dict(handled)
    assert overlap_within_key == 1, "one key's messages never run at once"
    assert overlap_across_keys > 1, "different keys do"


async def test_a_failed_message_is_retried_before_later_ones_of_its_key(mq: aioredmq.Client) -> None:
    pq = mq.partitioned("retry", partitions=2, retry=aioredmq.RetryPolicy(backoff_initial_s=0.05))
    await pq.publish_many([("k", 1), ("k", 2), ("k", 3)])
    handled: list[tuple[int, int]] = []

    async def handle(msg: aioredmq.Message[Any]) -> None:
        handled.append((msg.body, msg.deliveries))
        if msg.body == 1 and msg.deliveries < 3:
            raise RuntimeError("try again")

    async with anyio.create_task_group() as tg:
        run_in(tg, pq.consume(), handle)
        await wait_for(lambda: len(handled) == 5, what="three messages and two retries")
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert handled == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
    stats = await pq.stats()
    assert all((p.ready, p.in_flight, p.delayed, p.dead) == (0, 0, 0, 0) for p in stats.partitions)


async def test_partitions_are_shared_and_rebalanced_without_loss(mq: aioredmq.Client) -> None:
    pq = mq.partitioned("shared", partitions=6, lease_s=1.5)
    handled: dict[str, list[int]] = defaultdict(list)

    async def handle(msg: aioredmq.Message[Any]) -> None:
        handled[msg.headers["aioredmq-key"]].append(msg.body)

    a, b = pq.consume(name="a"), pq.consume(name="b")
    total = 0

    async def publish(n: int) -> None:
        nonlocal total
        await pq.publish_many([(f"k{k}", total + i) for i in range(n) for k in range(12)])
        total += n

    async with anyio.create_task_group() as tg:
        run_in(tg, a, handle)
        await wait_for(lambda: len(a.held_partitions) == 6, what="a to hold every partition")
        await publish(20)
        run_in(tg, b, handle)
        await wait_for(
            lambda: sorted(a.held_partitions + b.held_partitions) == list(range(6)) and len(b.held_partitions) == 3,
            what="a to hand half over to b",
        )
        await publish(20)
        stats = await pq.stats()
        assert sorted(stats.holders.values()) == ["a"] * 3 + ["b"] * 3
        await wait_for(lambda: sum(map(len, handled.values())) == 12 * total, what="every message")
        b.stop_delivery()  # b's workers end, it closes and leaves: a takes everything back
        await wait_for(lambda: b.closed and len(a.held_partitions) == 6, what="a to take b's partitions back")
        await publish(10)
        await wait_for(lambda: sum(map(len, handled.values())) == 12 * total, what="every message after b left")
        tg.cancel_scope.cancel()
    assert all(seq == list(range(total)) for seq in handled.values())
    stats = await pq.stats()
    assert stats.holders == {}, "closing members release their partitions"
    assert stats.members == {}, "and leave"


@pytest.mark.slow
@pytest.mark.fault
async def test_1000_keys_stay_in_order_when_one_of_four_consumers_is_sigkilled(
    tmp_path: Path, redis_url: str, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    keys, per_key = 1000, 20
    pq = mq.partitioned("big", partitions=16)
    options = ("--partitions", "16", "--lease-s", "2", "--concurrency", "32")

    def worker(i: int) -> Any:
        (tmp_path / str(i)).mkdir()
        return worker_process(
            tmp_path / str(i), redis_url, "tests.workers:ordered_handler", "big", *options, source="--partitioned"
        )

    async with worker(0) as w0, worker(1), worker(2), worker(3):

        async def members() -> bool:
            return len((await pq.stats()).members) == 4

        await poll(members, 20, "four members")
        for seq in range(per_key):
            await pq.publish_many([(f"key{k}", seq) for k in range(keys)])

        async def midway() -> bool:
            return await raw.llen(ORDER) >= keys * per_key // 2

        await poll(midway, 30, "half the messages")
        w0.send_signal(signal.SIGKILL)

        async def all_effects() -> bool:
            n = 0
            for k in range(0, keys, 50):
                n += await raw.llen(f"test:effects:key{k}")
            return (
                n == (keys // 50) * per_key and sum(p.ready + p.in_flight for p in (await pq.stats()).partitions) == 0
            )

        await poll(all_effects, 40, "every message to be handled after the kill")
    handlings: dict[str, list[int]] = defaultdict(list)
    redelivered = 0
    for entry in await lrange_bytes(raw, ORDER):
        key, seq_text, deliveries = entry.decode().split()
        handlings[key].append(int(seq_text))
        redelivered += int(deliveries) > 1
    assert len(handlings) == keys
    assert redelivered > 0, "the killed worker held messages: they came back with a raised count"
    for key, seqs in handlings.items():
        seen: set[int] = set()
        for seq in seqs:  # a redelivery may repeat a message, never run ahead of an earlier one
            assert all(earlier in seen for earlier in range(seq)), f"{key}: {seq} ran before an earlier one: {seqs}"
            seen.add(seq)
        assert seen == set(range(per_key)), f"{key} lost messages: {seqs}"
        effects = [int(v) for v in await lrange_bytes(raw, f"test:effects:{key}")]
        assert effects == list(range(per_key)), f"{key}: effects {effects}"
    stats = await pq.stats()
    assert all(p.dead == 0 for p in stats.partitions)
    handled = sum(len(seqs) for seqs in handlings.values())
    report("per-key order: 1,000 keys, one of four consumers SIGKILLed", keys * per_key,
           duplicated=handled - keys * per_key,
           faults=f"SIGKILL; no key ran a message before an earlier one, {redelivered} redelivered")  # fmt: skip


async def test_a_cancelled_handler_is_not_overtaken_by_later_messages_of_its_key(mq: aioredmq.Client) -> None:
    pq = mq.partitioned("cancelled", partitions=2)
    await pq.publish_many([("k", 1), ("k", 2), ("k", 3)])
    async with pq.consume() as consumer:
        first = await consumer.__anext__()
        with anyio.CancelScope() as scope:
            async with first.process():
                scope.cancel()
                await anyio.sleep(5)
        order = []
        for _ in range(3):
            msg = await consumer.__anext__()
            order.append((msg.body, msg.deliveries))
            await msg.ack()
    assert order == [(1, 2), (2, 1), (3, 1)]
    stats = await pq.stats()
    assert all((p.ready, p.in_flight) == (0, 0) for p in stats.partitions)
