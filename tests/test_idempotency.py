"""The idempotency helper against a real redis-server: each effect once per message id."""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.envelope import with_attempts

from .helpers import lrange_bytes, settled_stats, wait_for, zrange_with_scores
from .ledger import report
from .test_crash import poll, worker_process
from .workers import EFFECTS

pytestmark = pytest.mark.timeout(60)


async def duplicate_of(raw: aioredis.Redis, queue: aioredmq.Queue[Any], msg: aioredmq.Message[Any]) -> None:
    """Put the same message (same id) in line again, as a crash or a lost lease would: with
    its attempt count raised, as the reaper writes it. (The very same bytes, while the first
    copy is still held, would name the same delivery: not a case Redis can produce.)"""
    await raw.lpush(queue.keys.ready, with_attempts(msg.raw, msg.deliveries))


@pytest.mark.fault
async def test_a_sigkill_between_the_effect_and_the_ack_does_not_repeat_the_effect(
    tmp_path: Path, redis_url: str, mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    q = mq.queue("once")
    mid = await q.publish({"order": 7})

    def worker(where: Path) -> Any:
        return worker_process(where, redis_url, "tests.workers:idempotent_handler", "once", "--name", "w1")

    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    async with worker(tmp_path / "1") as first:

        async def effect_applied() -> bool:
            return await raw.llen(EFFECTS) == 1

        await poll(effect_applied, 20, "the first delivery to apply its effect")
        first.send_signal(signal.SIGKILL)  # the effect is in; the ack never will be
        await first.wait()
    assert (await q.stats()).in_flight == 1
    # The same name again: it finds what its last life held and delivers it once more.
    async with worker(tmp_path / "2"):

        async def redelivered() -> bool:
            return await raw.llen(EFFECTS) == 2

        await poll(redelivered, 20, "the redelivery")
        await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)
    records = [e.decode() for e in await lrange_bytes(raw, EFFECTS)]
    assert records == [f"{mid} 1 1", f"{mid} 2 0"], "delivered twice, applied once"
    assert await raw.get(f"test:effect:{mid}") == b"1"
    report(
        "SIGKILL between the handler's effect and its ack, with the idempotency helper",
        1,
        duplicated=1,
        faults="SIGKILL after the effect (delivered twice, effect applied once)",
    )


async def test_process_acks_with_the_marker_and_skips_a_later_duplicate(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    q = mq.queue("dup")
    once = aioredmq.Idempotency(ttl_s=60)
    await q.publish_many(["a", "b"])
    done: list[str] = []
    async with q.consume() as consumer:
        for _ in range(2):
            msg = await consumer.__anext__()
            async with once.process(msg) as fresh:
                assert fresh
                done.append(msg.body)
            with anyio.fail_after(10):  # the ack and the marker reach Redis together
                while not await once.seen(msg):  # noqa: ASYNC110 - polls Redis, not local state
                    await anyio.sleep(0.01)
            await duplicate_of(raw, q, msg)
        for _ in range(2):
            dup = await consumer.__anext__()
            assert await once.seen(dup)
            async with once.process(dup) as fresh:
                assert not fresh
    assert done == ["a", "b"]
    await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)
    markers = await zrange_with_scores(raw, q.keys.done)
    assert len(markers) == 2
    now_ms = int((await raw.time())[0]) * 1000
    assert all(now_ms + 55_000 < expiry <= now_ms + 61_000 for _, expiry in markers), "ttl_s=60"


async def test_a_failed_handler_writes_no_marker_and_is_retried(mq: aioredmq.Client) -> None:
    q = mq.queue("fails", retry=aioredmq.RetryPolicy(backoff_initial_s=0))
    once = aioredmq.Idempotency()
    await q.publish("x")
    async with q.consume() as consumer:
        msg = await consumer.__anext__()
        async with once.process(msg) as fresh:
            assert fresh
            raise RuntimeError("boom")  # logged and nacked, not raised
        again = await consumer.__anext__()
        assert again.deliveries == 2
        async with once.process(again) as fresh:
            assert fresh, "the failure left no marker"
    await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)


async def test_markers_are_per_group_and_expire(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    s = mq.stream("groups")
    once = aioredmq.Idempotency(ttl_s=0.3)
    await s.create_group("a")
    await s.create_group("b")
    await s.publish("x")
    async with s.consume("a") as a, s.consume("b") as b:
        for consumer in (a, b):
            msg = await consumer.__anext__()
            assert await once.apply(msg, ("RPUSH", "{groups}:log", consumer.group)) is True
            assert await once.apply(msg, ("RPUSH", "{groups}:log", consumer.group)) is False
            await msg.ack()
        await anyio.sleep(0.4)
        assert not await once.seen(msg), "the marker expired"
    assert await raw.lrange("{groups}:log", 0, -1) == [b"a", b"b"]
    assert await raw.zcard(s.keys.done("a")) == 1
    await raw.zadd(s.keys.done("a"), {"expired-long-ago": 1})
    async with s.consume("a") as a:
        await s.publish("y")
        await once.apply(await a.__anext__(), ("INCR", "{groups}:n"))
    assert await raw.zrange(s.keys.done("a"), 0, -1) != [b"expired-long-ago"]
    assert await raw.zscore(s.keys.done("a"), "expired-long-ago") is None, "expired markers are purged"


async def test_the_runner_skips_marked_messages(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    q = mq.queue("runner")
    ids = await q.publish_many(range(5))
    handled: list[int] = []
    first: list[aioredmq.Message[Any]] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        handled.append(msg.body)
        first[:] = first or [msg]

    run: Callable[[], Any] = partial(mq.run, q, handler, idempotency=aioredmq.Idempotency())
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for(lambda: len(handled) == 5, what="every message")
        await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)
        await duplicate_of(raw, q, first[0])  # after its ack and marker landed
        await settled_stats(q, ready=0, in_flight=0, delayed=0, dead=0)
        tg.cancel_scope.cancel()
    assert sorted(handled) == [0, 1, 2, 3, 4]
    assert await raw.zcard(q.keys.done) == len(ids)


async def test_apply_checks_its_commands(mq: aioredmq.Client) -> None:
    q = mq.queue("bad")
    await q.publish(1)
    async with q.consume() as consumer:
        msg = await consumer.__anext__()
        with pytest.raises(TypeError, match="name, key"):
            await aioredmq.Idempotency().apply(msg, ("INCR",))
        await msg.ack()
    with pytest.raises(aioredmq.ConfigError, match="ttl_s"):
        aioredmq.Idempotency(ttl_s=0)
