"""Regression tests for the review findings, one per finding, against a real redis-server.

Each test reproduces the situation a reviewer's script built and asserts the fixed
behaviour. Faults come from the TCP proxy (lost replies, an unreachable server), from
Redis itself (refused writes) or from a SIGSTOPped child process. Every wait is bounded
and fails saying what it waited for; no assertion is on how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.envelope import decode, encode
from aioredmq.ids import new_id
from aioredmq.keys import QueueKeys
from aioredmq.testing import RedisServer

from .conftest import PYTHON, ROOT, subprocess_env
from .helpers import lrange_bytes, mq_url, settled_stats, wait_for
from .proxy import FaultProxy
from .test_network_faults import NIL_REPLIES, is_error, pmq, proxy  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    """Await ``check()`` until true; fail with ``what`` after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - polls state in Redis
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def blocked_in_blmove(raw: aioredis.Redis) -> bool:
    """True when some client of the server waits inside a BLMOVE right now."""
    return any(c["cmd"] == "blmove" and "b" in c["flags"] for c in await raw.client_list())


@contextlib.contextmanager
def child_output(tmp_path: Path) -> Iterator[IO[bytes]]:
    with open(tmp_path / "child.out", "wb") as out:
        yield out


def log_count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


# -- 1. a lost reply to a blocking move --------------------------------------------------


async def test_a_lost_move_reply_never_makes_the_consumer_hold_more_than_prefetch(
    proxy: FaultProxy,  # noqa: F811
    pmq: aioredmq.Client,  # noqa: F811
    mq: aioredmq.Client,
    raw: aioredis.Redis,
) -> None:
    """A lost BLMOVE reply made the consumer hold prefetch + 1; a second one gave take a negative count."""
    producer = mq.queue("r-prefetch")
    queue = pmq.queue("r-prefetch", lease_s=30.0)
    # Empty replies (the wait timed out) pass; a move that carries a message loses its reply.
    fault = proxy.fail_reply(b"BLMOVE", times=2, keep_reply=lambda r: is_error(r) or r in NIL_REPLIES)
    got: list[str] = []
    async with queue.consume(prefetch=1, block_s=5.0) as consumer:
        await wait_for(lambda: fault.matched > 0, what="the consumer to block in BLMOVE")
        published = await producer.publish_many(list(range(10)))
        await wait_for(lambda: fault.fired == 1, what="the reply of the first move to be lost")
        await wait_for(lambda: consumer.stats.adopted == 1, what="the moved message to be adopted")
        with anyio.fail_after(10):
            async for msg in consumer:
                assert consumer.held <= 1
                assert await raw.llen(queue.keys.inflight(consumer.name)) <= 1
                got.append(msg.id)
                await msg.ack()
                if len(got) == len(published):
                    break
        assert fault.fired == 1, "only one move had its reply lost: the consumer never moved past prefetch"
        assert consumer.stats.adopted == 1
    assert got == published
    await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=0)


# -- 2. a settle Redis refuses for a moment ------------------------------------------------


async def test_a_settle_refused_for_a_moment_is_retried_not_forgotten(
    mq: aioredmq.Client, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack Redis refused once (NOREPLICAS) was dropped from the books and stuck in flight for good."""
    caplog.set_level(logging.WARNING, logger="aioredmq.consumer")
    queue = mq.queue("r-refused", lease_s=30.0)
    ids = await queue.publish_many(["x", "y"])
    inflight = None
    try:
        async with queue.consume(prefetch=10, block_s=10.0) as consumer:
            inflight = queue.keys.inflight(consumer.name)
            first = await consumer.__anext__()
            # Both fetched, and the fetch loop waits in BLMOVE: only the ack meets the refusal.
            await wait_for(lambda: consumer.held == 2, what="both messages to be fetched")
            await poll(lambda: blocked_in_blmove(raw), "the consumer to wait in BLMOVE")
            await raw.config_set("min-replicas-to-write", 1)  # writes refused from now on
            await first.ack()
            await wait_for(lambda: log_count(caplog, "NOREPLICAS") > 0, what="the ack to be refused")
            assert first.raw in await raw.lrange(inflight, 0, -1)
            await raw.config_set("min-replicas-to-write", 0)  # healthy again
            await poll(lambda: _not_in(raw, inflight, first.raw), "the refused ack to be retried and reach Redis")
            await wait_for(lambda: consumer.held == 1, what="the consumer to learn its ack was applied")
            assert consumer.stats.late_settles == 0
    finally:
        await raw.config_set("min-replicas-to-write", 0)
    # Closing gave back only the message never handed out; the acked one is gone for good.
    assert [decode(r).id for r in await lrange_bytes(raw, queue.keys.ready)] == [ids[1]]
    await settled_stats(queue, ready=1, in_flight=0, delayed=0, dead=0)


async def _not_in(raw: aioredis.Redis, key: str, value: bytes) -> bool:
    return value not in await raw.lrange(key, 0, -1)


# -- 3. deeply nested JSON ---------------------------------------------------------------


async def test_deeply_nested_json_is_dead_lettered_and_the_rest_is_delivered(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """Deeply nested JSON raised RecursionError: the fetch loop died, or a named consumer never opened."""
    queue = mq.queue("r-deep", lease_s=30.0)
    nested = b"[" * 100_000
    deep_headers = b"amq1 %b 0 0 json %d\n%b1" % (new_id().encode(), len(nested), nested)
    deep_body = encode(new_id(), 0, 0, "json", None, nested)
    # Left in worker-1's in-flight list by its last life; found again when it restarts.
    await raw.lpush(queue.keys.inflight("worker-1"), deep_headers)
    ids = [await queue.publish("before")]
    await raw.lpush(queue.keys.ready, deep_body)  # a foreign writer, between two of ours
    ids += await queue.publish_many(["after1", "after2"])
    got: list[Any] = []
    async with queue.consume(name="worker-1", prefetch=10, block_s=0.2) as consumer:
        with anyio.fail_after(10):
            async for msg in consumer:
                got.append((msg.id, msg.body))
                await msg.ack()
                if len(got) == 3:
                    break
    assert got == list(zip(ids, ["before", "after1", "after2"], strict=True))
    await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=2)
    dead = await queue.dead_letters()
    assert sorted(d.raw for d in dead) == sorted([deep_headers, deep_body])
    assert all(d.reason.startswith("undecodable") for d in dead), [d.reason for d in dead]


# -- 4. a consumer frozen inside a blocking wait -------------------------------------------

FROZEN_CHILD = """
import asyncio, sys
import aioredmq

async def main():
    async with aioredmq.connect(sys.argv[1]) as mq:
        queue = mq.queue(sys.argv[2], lease_s=1.0)
        async with queue.consume(name="frozen", block_s=30.0) as consumer:
            async for msg in consumer:
                await msg.ack()

asyncio.run(main())
"""


async def test_a_consumer_frozen_in_a_blocking_wait_cannot_swallow_a_message_after_its_lease_is_gone(
    mq: aioredmq.Client, raw: aioredis.Redis, tmp_path: Path
) -> None:
    """With block_s > lease_s, a consumer frozen in BLMOVE outlived its reaped lease, then swallowed a new message."""
    queue = mq.queue("r-frozen", lease_s=1.0)
    with child_output(tmp_path) as out:
        child = await anyio.open_process(
            [PYTHON, "-c", FROZEN_CHILD, mq_url(mq), queue.name],
            stdin=None,
            stdout=out,
            stderr=out,
            env=subprocess_env(),
            cwd=ROOT,
        )
    try:
        await poll(lambda: blocked_in_blmove(raw), "the child consumer to wait in BLMOVE", 15)
        child.send_signal(signal.SIGSTOP)  # a VM pause: its socket stays open, it answers nothing
        async with queue.consume(name="live", block_s=0.2) as live:

            async def lease_forgotten() -> bool:
                return await raw.zscore(queue.keys.leases, "frozen") is None

            await poll(lease_forgotten, "the live consumer to reap and forget the frozen one", 15)
            message_id = await queue.publish("published after the lease was forgotten")
            child.kill()
            with anyio.fail_after(10):
                msg = await live.__anext__()
            assert msg.id == message_id
            await msg.ack()
        assert await raw.llen(queue.keys.inflight("frozen")) == 0
    finally:
        if child.returncode is None:
            child.kill()
        with anyio.move_on_after(10, shield=True):
            await child.wait()
    await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=0)


# -- 5. delivery after close has begun -----------------------------------------------------


async def test_no_message_is_handed_out_once_close_has_begun(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    """__anext__ handed out buffered messages after aclose() began; close then released them with a raised count."""
    queue = mq.queue("r-close-race")
    ids = await queue.publish_many(["a", "b", "c"])
    consumer = queue.consume(prefetch=10, block_s=0.2)
    await consumer.__aenter__()
    try:
        first = await consumer.__anext__()
        async with first.process():
            pass
        await wait_for(
            lambda: consumer.stats.fetched == 3 and consumer.held == 2,
            what="b and c to be buffered, a acked",
        )
        closing = asyncio.create_task(consumer.aclose())
        await asyncio.sleep(0)  # aclose runs up to its first await: the consumer is closing
        assert consumer.closed
        with pytest.raises(StopAsyncIteration):
            await consumer.__anext__()
        await closing
    finally:
        await consumer.aclose()
    assert consumer.stats.delivered == 1
    # Never handed out: back at the front, in order, delivery count unchanged.
    ready = [decode(r) for r in reversed(await lrange_bytes(raw, queue.keys.ready))]
    assert [(env.id, env.attempts) for env in ready] == [(ids[1], 0), (ids[2], 0)]
    await settled_stats(queue, ready=2, in_flight=0, delayed=0, dead=0)


# -- 6. an error in the last steps of close ----------------------------------------------


async def test_a_connection_error_while_closing_still_stops_the_tasks_and_frees_the_connection(
    proxy: FaultProxy,  # noqa: F811
    pmq: aioredmq.Client,  # noqa: F811
) -> None:
    """A transient error late in close escaped aclose: the settle task kept running, the connection stayed open."""
    queue = pmq.queue("r-close-error")
    consumer = queue.consume(block_s=0.2, close_timeout_s=5.0)
    await consumer.__aenter__()
    # Armed after the open: the next LRANGE is close's look for a blocking move that landed.
    fault = proxy.fail_reply(b"LRANGE", keep_reply=is_error)
    with anyio.fail_after(10):
        await consumer.aclose()  # does not raise
    assert fault.fired == 1
    assert consumer.closed
    assert [t.get_name() for t in consumer._tasks._tasks if not t.done()] == []
    assert consumer._conn is not None
    assert consumer._conn not in pmq._dedicated


# -- 7. the timer while Redis is unreachable -----------------------------------------------


async def test_the_timer_does_not_spin_while_redis_is_unreachable_with_a_retry_due(
    proxy: FaultProxy,  # noqa: F811
    pmq: aioredmq.Client,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis unreachable and a delayed retry due, the timer retried its tick in a busy loop, flooding the log."""
    caplog.set_level(logging.WARNING, logger="aioredmq.consumer")
    queue = pmq.queue("r-timer", lease_s=30.0)  # regular heartbeats only every 10 s
    await queue.publish("x")
    async with queue.consume(block_s=0.2, close_timeout_s=0.5) as consumer:
        msg = await consumer.__anext__()
        await msg.nack(delay_s=1.0)
        await wait_for(lambda: consumer.held == 0, what="the nack to reach Redis")
        await proxy.aclose()  # from now on every connection attempt is refused at once

        await wait_for(
            lambda: log_count(caplog, "heartbeat failed") > 0,
            what="the tick at the retry's due time to fail",
        )
        await anyio.sleep(0.5)  # a spinning timer fails thousands of times in this while
        assert log_count(caplog, "heartbeat failed") <= 2


# -- 8. run() and the consumer's error -----------------------------------------------------


async def test_run_raises_the_consumers_own_error_not_an_exception_group(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """mq.run() surfaced a fetch error (the ready key holds a string) as nested ExceptionGroups."""
    queue = mq.queue("r-run-error")
    await raw.set(queue.keys.ready, "not a list")
    handled: list[aioredmq.Message[Any]] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        handled.append(msg)

    with anyio.fail_after(10), pytest.raises(aioredmq.WrongTypeError) as caught:
        await mq.run(queue, handler, concurrency=4)
    assert type(caught.value) is aioredmq.WrongTypeError
    assert queue.keys.ready in str(caught.value)
    assert handled == []
    assert await raw.get(queue.keys.ready) == b"not a list"


# -- 9. envelopes the Lua scripts cannot parse ---------------------------------------------

FOREIGN = [
    b'amq1 Order42 0 0 json 0\n"not hex"',
    b'amq1 ABCDEF0123 0 0 json 0\n"upper-case hex"',
    b'amq1 abcdef +0 0 json 0\n"signed count"',
    b'amq1 abcdef 0_1 0 json 0\n"underscored count"',
    'amq1 abcdef \u0663 0 json 0\n"arabic-indic digit"'.encode(),
]


async def test_envelopes_the_lua_scripts_cannot_parse_are_dead_lettered_on_fetch(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """decode() took ids and counts Lua cannot parse ('Order42', '+0'): their acks were late, they stuck in flight."""
    for envelope in FOREIGN:
        with pytest.raises(aioredmq.DecodeError):
            decode(envelope)
    queue = mq.queue("r-foreign")
    ids = [await queue.publish("ours")]
    await raw.lpush(queue.keys.ready, *FOREIGN)
    ids.append(await queue.publish("ours too"))
    async with queue.consume(prefetch=10, block_s=0.2) as consumer:
        with anyio.fail_after(10):
            got = [await consumer.__anext__() for _ in ids]
        assert [m.id for m in got] == ids
        for msg in reversed(got):  # out of order: the settle script looks through the list
            await msg.ack()
        await wait_for(lambda: consumer.held == 0, what="every settle to reach Redis")
        assert consumer.stats.late_settles == 0
        assert consumer.stats.dead_lettered == len(FOREIGN)
    await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=len(FOREIGN))
    assert sorted(d.raw for d in await queue.dead_letters()) == sorted(FOREIGN)


# -- 10. a foreign member of the leases set ----------------------------------------------


async def test_a_foreign_member_of_the_leases_set_does_not_stop_heartbeats(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """One non-UTF-8 member in the leases sorted set crashed every consumer's timer: heartbeats stopped."""
    lease_ms = 600
    queue = mq.queue("r-lease-garbage", lease_s=lease_ms / 1000)
    # Expired long ago, so every tick lists them among the consumers to reap.
    await raw.zadd(queue.keys.leases, {b"\xff\xfe": 1, b"not a {consumer} name": 1})
    first_id = await queue.publish("held across several leases")
    async with queue.consume(block_s=0.2) as consumer:
        with anyio.fail_after(10):
            first = await consumer.__anext__()
        assert first.id == first_id
        deadline = await raw.zscore(queue.keys.leases, consumer.name)
        assert deadline is not None

        async def renewed() -> bool:
            now = await raw.zscore(queue.keys.leases, consumer.name)
            return now is not None and now > deadline + 3 * lease_ms

        await poll(renewed, "the lease to be renewed over three lease lengths")
        await first.ack()
        second_id = await queue.publish("after")
        with anyio.fail_after(10):
            second = await consumer.__anext__()  # the iterator still works: no crash surfaced
        assert second.id == second_id
        await second.ack()
        await wait_for(lambda: consumer.held == 0, what="both acks to reach Redis")
        assert consumer.stats.late_settles == 0
    assert await raw.llen(queue.keys.ready) == 0
    assert await raw.llen(queue.keys.dead) == 0


# -- 11. a non-finite nack delay -----------------------------------------------------------


async def test_a_non_finite_nack_delay_is_refused_and_leaves_the_message_unsettled(mq: aioredmq.Client) -> None:
    """nack(delay_s=inf) marked the message settled, then failed on int(inf): no settle sent, a later ack refused."""
    queue = mq.queue("r-nack-inf")
    await queue.publish("x")
    async with queue.consume(block_s=0.2) as consumer:
        with anyio.fail_after(10):
            msg = await consumer.__anext__()
        for delay in (math.inf, -math.inf, math.nan):
            with pytest.raises(aioredmq.ConfigError, match="delay_s"):
                await msg.nack(delay_s=delay)
            assert not msg.settled
        await msg.ack()
        assert msg.settled
        await wait_for(lambda: consumer.held == 0, what="the ack to reach Redis")
        assert (consumer.stats.acked, consumer.stats.nacked) == (1, 0)
    await settled_stats(queue, ready=0, in_flight=0, delayed=0, dead=0)


# -- 12. a caller's client that decodes responses ------------------------------------------


async def test_connect_refuses_a_client_that_decodes_responses(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    """A caller's client with decode_responses=True was accepted; every fetch then failed on str replies."""
    decoding = aioredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    try:
        with pytest.raises(aioredmq.ConfigError, match="decode_responses"):
            async with aioredmq.connect(decoding) as mq:
                await mq.queue("r-decode").publish("x")
        assert await decoding.ping()  # the caller's client is not closed or changed
    finally:
        await decoding.aclose()
    assert await raw.dbsize() == 0
    plain = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        async with aioredmq.connect(plain) as mq:  # the same client without decoding is fine
            await mq.queue("r-decode").publish("x")
    finally:
        await plain.aclose()
    assert await raw.llen(QueueKeys("aioredmq", "r-decode").ready) == 1


# -- 13. a circular or too-deep body -------------------------------------------------------


async def test_publishing_a_circular_or_too_deep_body_raises_type_error_before_sending(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A circular or very deeply nested JSON body escaped the cached encoder as RecursionError, not TypeError."""
    queue = mq.queue("r-circular")
    looped_list: list[Any] = []
    looped_list.append(looped_list)
    looped_dict: dict[str, Any] = {}
    looped_dict["self"] = looped_dict
    deep: list[Any] = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    for body in (looped_list, looped_dict, deep):
        with pytest.raises(TypeError):
            await queue.publish(body)
        with pytest.raises(TypeError):
            await queue.publish_many(["fine", body])  # checked before anything is sent
    assert await raw.dbsize() == 0
    message_id = await queue.publish("still works")
    assert [decode(r).id for r in await lrange_bytes(raw, queue.keys.ready)] == [message_id]


# -- later findings ------------------------------------------------------------------------


async def test_foreign_lease_members_are_forgotten_and_never_block_reaping(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """Foreign members were skipped but kept: sixteen of them took every reap slot, and a dead
    consumer's messages were never recovered; stats() crashed on a non-UTF-8 member."""
    queue = mq.queue("r-foreign", lease_s=0.3)
    foreign = {b"\xff\xfe" + bytes([i]): 1 for i in range(20)}
    await raw.zadd(queue.keys.leases, foreign)
    stats = await queue.stats()  # does not raise on undecodable members
    assert len(stats.consumers) == 20
    # A consumer that died holding a message, its lease long expired.
    mid = await queue.publish("held by the dead")
    await raw.lmove(queue.keys.ready, queue.keys.inflight("dead-one"), "RIGHT", "LEFT")
    await raw.zadd(queue.keys.leases, {"dead-one": 2})
    async with queue.consume(block_s=0.1) as consumer:
        with anyio.fail_after(10):
            msg = await consumer.__anext__()
        assert (msg.id, msg.deliveries) == (mid, 2)
        await msg.ack()

        async def forgotten() -> bool:
            members = await raw.zrange(queue.keys.leases, 0, -1)
            return not set(members) & set(foreign)

        await poll(forgotten, "the foreign members to be forgotten")


async def test_a_fetch_refused_for_a_moment_is_retried(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    """NOREPLICAS (or READONLY, LOADING, BUSY) on the fetch's own command stopped the fetch for good."""
    queue = mq.queue("r-refused-fetch")
    async with queue.consume(block_s=0.2) as consumer:
        await raw.config_set("min-replicas-to-write", 1)
        try:
            await wait_for(lambda: consumer.stats.connection_errors > 0, what="a refused fetch")
        finally:
            await raw.config_set("min-replicas-to-write", 0)
        mid = await queue.publish("after the refusal")
        with anyio.fail_after(10):
            msg = await consumer.__anext__()
        assert msg.id == mid
        await msg.ack()


async def test_a_publish_refused_for_a_moment_is_retried_without_a_duplicate(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A publish refused with NOREPLICAS failed at once instead of being retried."""
    queue = mq.queue("r-refused-publish")
    await raw.config_set("min-replicas-to-write", 1)

    async def allow_soon() -> None:
        await anyio.sleep(0.2)
        await raw.config_set("min-replicas-to-write", 0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(allow_soon)
        mid = await queue.publish("refused, then accepted")
    assert [decode(e).id for e in await lrange_bytes(raw, queue.keys.ready)] == [mid]


async def test_closing_puts_a_stray_from_a_cancelled_read_behind_the_older_messages_it_held(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    # A blocking move cancelled on close may land in the in-flight list unknown to the
    # consumer. It is newer than what the consumer held; giving it back first put it in
    # front of them, which broke a partitioned queue's per-key order on a hand-over.
    q = mq.queue("strays")
    await q.publish_many(["old1", "old2"])
    async with q.consume(prefetch=10) as consumer:
        await wait_for(lambda: consumer.held == 2, what="the two messages to be fetched")
        stray = encode(new_id(), 0, 1, "json", None, b'"new"')
        await raw.lpush(q.keys.inflight(consumer.name), stray)  # as a landed, unanswered BLMOVE would
    line = [decode(e).id for e in reversed(await lrange_bytes(raw, q.keys.ready))]
    bodies = []
    async with q.consume() as consumer:
        for _ in line:
            msg = await consumer.__anext__()
            bodies.append(msg.body)
            await msg.ack()
    assert bodies == ["old1", "old2", "new"]
