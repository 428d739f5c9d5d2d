"""Delayed delivery against a real redis-server: never early, never twice, cancellable.

Times are compared on one machine's clock: a message published at ``t`` with ``delay=d``
is due at the server's ``t' + d`` with ``t' >= t``, so handling it before ``t + d`` would be
early. (1 ms of slack covers the server's millisecond rounding.) No test asserts how
soon after its due time a message arrives: that is measured by the benchmarks.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq

from .helpers import lrange_bytes, wait_for
from .ledger import report
from .test_crash import poll, worker_process
from .workers import TIMED

pytestmark = pytest.mark.timeout(60)

SLACK_S = 0.002


async def collect(
    consumer: aioredmq.Consumer[Any] | aioredmq.StreamConsumer[Any],
    n: int,
    seen: list[tuple[Any, float]],
    timeout_s: float = 10.0,
) -> None:
    with anyio.fail_after(timeout_s):
        async for msg in consumer:
            seen.append((msg.body, time.time()))
            await msg.ack()
            if len(seen) == n:
                return


async def test_nothing_is_delivered_before_its_due_time(mq: aioredmq.Client) -> None:
    q = mq.queue("later")
    seen: list[tuple[Any, float]] = []
    async with q.consume() as consumer:  # open and idle first: it must hear of the new due times
        t0 = time.time()
        await q.publish("0.6", delay=0.6)
        await q.publish("0.2", delay=0.2)
        await q.publish_many(["0.4a", "0.4b"], delay=0.4)
        await q.publish("at", at=datetime.now(UTC) + timedelta(seconds=0.3))
        await q.publish("now")
        assert (await q.stats()).delayed == 5
        await collect(consumer, 6, seen)
    assert [body for body, _ in seen] == ["now", "0.2", "at", "0.4a", "0.4b", "0.6"]
    for body, handled in seen[1:]:
        due = t0 + (0.3 if body == "at" else float(body.rstrip("ab")))
        assert handled >= due - SLACK_S, f"{body} was handled {due - handled:.3f}s early"
    stats = await q.stats()
    assert (stats.delayed, stats.ready, stats.in_flight) == (0, 0, 0)
    assert await mq.redis.hlen(q.keys.scheduled) == 0


async def test_a_stream_delivers_a_delayed_message_to_every_group_once_due(mq: aioredmq.Client) -> None:
    s = mq.stream("later")
    await s.create_group("a")
    await s.create_group("b")
    seen_a: list[tuple[Any, float]] = []
    seen_b: list[tuple[Any, float]] = []
    async with s.consume("a") as a, s.consume("b") as b:
        t0 = time.time()
        ids = await s.publish_many([1, 2], delay=0.3)
        assert (await s.stats()).delayed == 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, a, 2, seen_a)
            tg.start_soon(collect, b, 2, seen_b)
    for seen in (seen_a, seen_b):
        assert [body for body, _ in seen] == [1, 2]
        assert all(handled >= t0 + 0.3 - SLACK_S for _, handled in seen)
    stats = await s.stats()
    assert (stats.length, stats.delayed) == (2, 0)
    assert len(ids) == 2


@pytest.mark.parametrize("kind", ["queue", "stream"])
async def test_three_consumers_racing_the_mover_deliver_each_message_once(mq: aioredmq.Client, kind: str) -> None:
    source = mq.queue("race") if kind == "queue" else mq.stream("race")
    consumers = [source.consume(prefetch=20) for _ in range(3)]
    handled: Counter[int] = Counter()
    early: list[int] = []
    due_at: dict[int, float] = {}

    async def run(consumer: aioredmq.Consumer[Any] | aioredmq.StreamConsumer[Any]) -> None:
        async with consumer:
            async for msg in consumer:
                if time.time() < due_at[msg.body] - SLACK_S:
                    early.append(msg.body)
                handled[msg.body] += 1
                await msg.ack()

    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(run, consumer)
        await wait_for(lambda: all(c.held == 0 and not c.closed for c in consumers), what="the consumers to open")
        await anyio.sleep(0.1)
        for i in range(300):
            delay = (i % 30) * 0.03
            due_at[i] = time.time() + delay
            await source.publish(i, delay=delay)
        await wait_for(lambda: len(handled) == 300, what="every delayed message to be handled")
        await anyio.sleep(0.3)  # a duplicate would show up by now
        tg.cancel_scope.cancel()
    assert early == []
    assert [n for n, count in handled.items() if count != 1] == []


async def test_a_scheduled_message_can_be_cancelled(mq: aioredmq.Client) -> None:
    q = mq.queue("cancel")
    keep = await q.publish("keep", delay=0.2)
    drop = await q.publish("drop", delay=0.1)
    assert await q.cancel(drop) is True
    assert await q.cancel(drop) is False, "already withdrawn"
    assert await q.cancel("00ff") is False, "never scheduled"
    with pytest.raises(aioredmq.ConfigError, match="message id"):
        await q.cancel("not an id")
    seen: list[tuple[Any, float]] = []
    async with q.consume() as consumer:
        await collect(consumer, 1, seen)
        await anyio.sleep(0.3)
        assert consumer.held == 0
    assert [body for body, _ in seen] == ["keep"]
    assert await q.cancel(keep) is False, "delivered: nothing to withdraw"
    s = mq.stream("cancel")
    assert await s.cancel(await s.publish(1, delay=60)) is True
    assert (await s.stats()).delayed == 0


async def test_a_retry_waits_in_the_same_delayed_set_and_can_be_cancelled(mq: aioredmq.Client) -> None:
    q = mq.queue("retry")
    mid = await q.publish("x")
    async with q.consume() as consumer:
        msg = await consumer.__anext__()
        await msg.nack(delay_s=0.3)
        await wait_for(lambda: consumer.held == 0, what="the nack to settle")
        assert (await q.stats()).delayed == 1
        assert await mq.redis.zscore(q.keys.delayed, mid) is not None
        again = await consumer.__anext__()
        assert (again.id, again.deliveries) == (mid, 2)
        await again.nack(delay_s=60)
        await wait_for(lambda: consumer.held == 0, what="the second nack to settle")
    assert await q.cancel(mid) is True
    stats = await q.stats()
    assert (stats.delayed, stats.ready, stats.in_flight, stats.dead) == (0, 0, 0, 0)


async def test_consumers_hear_of_due_times_again_after_the_notice_link_breaks(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    q = mq.queue("notice", lease_s=60)  # heartbeats every 20 s: only a notice can wake the consumer in time
    seen: list[tuple[Any, float]] = []
    async with q.consume() as consumer:
        watcher = await mq.due_watcher()
        assert await raw.client_kill_filter(_type="pubsub") == 1
        await wait_for(lambda: watcher.stats.reconnects == 1, what="the notice subscription to come back")
        await q.publish("after", delay=0.1)
        await collect(consumer, 1, seen, timeout_s=5)
    assert [body for body, _ in seen] == ["after"]


async def test_delay_arguments_are_checked(mq: aioredmq.Client) -> None:
    q = mq.queue("args")
    with pytest.raises(aioredmq.ConfigError, match="not both"):
        await q.publish(1, delay=1, at=datetime.now(UTC))
    with pytest.raises(aioredmq.ConfigError, match="timezone-aware"):
        await q.publish(1, at=datetime.now())  # naive: rejected
    with pytest.raises(aioredmq.ConfigError, match="delay"):
        await q.publish(1, delay=-1)
    with pytest.raises(aioredmq.ConfigError, match="delay"):
        await q.publish_many([1], delay=float("nan"))
    assert (await q.stats()).delayed == 0


@pytest.mark.slow
@pytest.mark.fault
async def test_a_killed_consumer_does_not_stop_the_others_moving_due_messages(
    tmp_path: Path, redis_url: str, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    q = mq.queue("kill", lease_s=3)
    n = 150
    for name in "abc":
        (tmp_path / name).mkdir()
    worker = partial(worker_process, redis_url=redis_url, handler="tests.workers:timed_handler", queue="kill")
    async with (
        worker(tmp_path / "a") as a,
        worker(tmp_path / "b") as b,
        worker(tmp_path / "c") as c,
    ):

        async def three_registered() -> bool:
            return await raw.zcard(q.keys.leases) == 3

        await poll(three_registered, 20, "three workers to register")
        start = datetime.now(UTC) + timedelta(seconds=1)
        due_ms = {}
        for i in range(n):
            at = start + timedelta(seconds=(i % 50) * 0.03)
            due_ms[await q.publish(i, at=at)] = at.timestamp() * 1000
        a.send_signal(signal.SIGKILL)  # before anything is due: it held nothing

        async def all_handled() -> bool:
            return await raw.llen(TIMED) >= n

        await poll(all_handled, 20, "the two survivors to handle every message")
        await anyio.sleep(0.5)
        for proc in (b, c):
            assert proc.returncode is None, "a survivor died"
    timed = [entry.decode().split() for entry in await lrange_bytes(raw, TIMED)]
    handled = Counter(mid for mid, _, _ in timed)
    assert set(handled) == set(due_ms)
    assert [mid for mid, count in handled.items() if count != 1] == []
    assert [mid for mid, _, ms in timed if int(ms) < due_ms[mid] - 1] == [], "handled early"
    report(
        "delayed delivery: three consumers race the mover, one SIGKILLed",
        n,
        faults="SIGKILL of one of three consumers (each message once, none early)",
    )


async def test_a_stream_message_that_came_due_before_any_consumer_reaches_the_new_group(mq: aioredmq.Client) -> None:
    s = mq.stream("due-early")
    await s.publish("waited", delay=0.05)
    await anyio.sleep(0.2)  # due, and nobody is there to append it yet
    seen: list[tuple[Any, float]] = []
    async with s.consume("fresh") as consumer:  # the group is created with start="new"
        await collect(consumer, 1, seen, timeout_s=5)
    assert [body for body, _ in seen] == ["waited"]
