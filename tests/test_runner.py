"""The handler runner: concurrency limit, timeouts, retries, and a graceful stop."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import anyio
import pytest

import aioredmq
from aioredmq import Message, RetryPolicy

from .helpers import settled_stats, wait_for
from .ledger import report


async def test_concurrency_is_limited_and_reached(mq: aioredmq.Client) -> None:
    q = mq.queue("limit")
    await q.publish_many(range(60))
    running = peak = done = 0

    async def handler(msg: Message[Any]) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        done += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, concurrency=7))
        await wait_for(lambda: done == 60, 20, "60 handled")
        tg.cancel_scope.cancel()
    assert peak == 7


async def test_a_handler_over_its_timeout_is_cut_and_retried(mq: aioredmq.Client) -> None:
    q = mq.queue("timeout", retry=RetryPolicy(max_deliveries=3, backoff_initial_s=0.01))
    mid = await q.publish("slow once")
    attempts: list[int] = []

    async def handler(msg: Message[Any]) -> None:
        attempts.append(msg.deliveries)
        if msg.deliveries == 1:
            await anyio.sleep(30)  # hangs: the timeout must cut it

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, handler_timeout_s=0.2))
        await wait_for(lambda: attempts == [1, 2], 10, "a retry after the timeout")
        await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)
        tg.cancel_scope.cancel()
    assert mid


@pytest.mark.fault
async def test_a_hung_handler_ends_in_dead_letter(mq: aioredmq.Client) -> None:
    q = mq.queue("hung", retry=RetryPolicy(max_deliveries=2, backoff_initial_s=0.01))
    await q.publish("hangs")

    async def handler(msg: Message[Any]) -> None:
        await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, handler_timeout_s=0.1))
        await settled_stats(q, dead=1, ready=0, in_flight=0)
        tg.cancel_scope.cancel()
    (record,) = await q.dead_letters()
    assert record.reason.startswith("TimeoutError")
    report("a hung handler, cut by its timeout", 1, dead=1, faults="handler never returns: timeout, retry, dead-letter")


async def test_cancel_lets_running_handlers_finish_and_returns_the_rest(mq: aioredmq.Client) -> None:
    q = mq.queue("graceful")
    sent = await q.publish_many(range(40))
    started: Counter[str] = Counter()
    finished: list[str] = []

    async def handler(msg: Message[Any]) -> None:
        started[msg.id] += 1
        await anyio.sleep(0.3)
        finished.append(msg.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, concurrency=4, prefetch=20, grace_s=5))
        await wait_for(lambda: len(started) == 4, 5, "4 running handlers")
        tg.cancel_scope.cancel()
    assert sorted(finished) == sorted(started), "every started handler ran to its end"
    stats = await settled_stats(q, in_flight=0, ready=40 - len(finished))
    assert stats.consumers == {}
    rest: list[tuple[str, int]] = []
    async with q.consume(prefetch=50, block_s=0.1) as consumer:
        async for msg in consumer:
            rest.append((msg.id, msg.deliveries))
            await msg.ack()
            if len(rest) == stats.ready:
                break
    assert sorted(finished + [mid for mid, _ in rest]) == sorted(sent)
    assert {d for _, d in rest} == {1}, "returned messages were never started"


async def test_grace_expiry_cancels_the_handler_and_gives_the_message_back(mq: aioredmq.Client) -> None:
    q = mq.queue("grace")
    mid = await q.publish("long")
    started = anyio.Event()

    async def handler(msg: Message[Any]) -> None:
        started.set()
        await anyio.sleep(30)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(mq.run, q, handler, grace_s=0.2))
            await started.wait()
            tg.cancel_scope.cancel()
    await settled_stats(q, ready=1, in_flight=0)
    async with q.consume(block_s=0.1) as consumer:
        msg = await consumer.__anext__()
        assert (msg.id, msg.deliveries) == (mid, 2)
        await msg.ack()


async def test_a_handler_cut_by_its_timeout_says_so_in_the_dead_letter_reason(mq: aioredmq.Client) -> None:
    q = mq.queue("timeout-reason", retry=RetryPolicy(max_deliveries=1))
    await q.publish_many(["hangs", "times out on its own", "raises without text"])

    async def handler(msg: Message[Any]) -> None:
        if msg.body == "hangs":
            await anyio.sleep(30)
        elif msg.body == "times out on its own":
            raise TimeoutError("billing did not answer")
        raise ValueError()

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(mq.run, q, handler, handler_timeout_s=0.25))
        await settled_stats(q, dead=3, ready=0, in_flight=0)
        tg.cancel_scope.cancel()
    reasons = {r.envelope.body: r.reason for r in await q.dead_letters() if r.envelope is not None}
    assert reasons == {
        b'"hangs"': "TimeoutError: handler timed out after 0.25 s; delivered 1 time (max_deliveries=1)",
        b'"times out on its own"': "TimeoutError: billing did not answer; delivered 1 time (max_deliveries=1)",
        b'"raises without text"': "ValueError; delivered 1 time (max_deliveries=1)",
    }
