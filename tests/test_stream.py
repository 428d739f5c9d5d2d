"""Streams against a real redis-server: groups, fan-out, recovery, dead letters, retention.

Leases are short (0.3-0.5 s) so recovery happens within a test; no assertion is on
timing, and every wait is bounded and says what it waited for.
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.envelope import Envelope, decode

from .helpers import single, stream_entries, stream_pending, wait_for
from .ledger import report
from .test_crash import listed_at_least, poll, records, wait_exit, worker_process
from .workers import STARTED

pytestmark = pytest.mark.timeout(60)

FAST_RETRY = aioredmq.RetryPolicy(max_deliveries=3, backoff_initial_s=0.01, backoff_max_s=0.05)


async def take(consumer: aioredmq.StreamConsumer[Any], n: int, timeout_s: float = 10.0) -> list[aioredmq.Message[Any]]:
    """The next ``n`` messages, failing after ``timeout_s``."""
    out: list[aioredmq.Message[Any]] = []
    with anyio.fail_after(timeout_s):
        while len(out) < n:
            out.append(await consumer.__anext__())
    return out


async def handle_all(
    stream: aioredmq.Stream[Any], group: str, expected: set[str], *, consumers: int = 1, **options: Any
) -> Counter[str]:
    """Run ``consumers`` consumers of ``group`` until every id in ``expected`` was acked; count handlings."""
    seen: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with stream.consume(group, name=f"{group}-{i}", **options) as consumer:
            async for msg in consumer:
                seen[msg.id] += 1
                await msg.ack()

    async with anyio.create_task_group() as tg:
        for i in range(consumers):
            tg.start_soon(one, i)
        await wait_for(lambda: expected <= seen.keys(), 15, f"group {group} to handle every message")
        tg.cancel_scope.cancel()
    return seen


async def pending_ids(raw: aioredis.Redis, stream: aioredmq.Stream[Any], group: str) -> dict[str, tuple[str, int]]:
    """Entry id -> (consumer, delivery count) for the group's pending entries."""
    return await stream_pending(raw, stream.keys.stream, group)


# -- groups and fan-out ------------------------------------------------------------------


async def test_fan_out_every_group_sees_every_entry_exactly_once(mq: aioredmq.Client) -> None:
    stream = mq.stream("fanout")
    for group in ("billing", "audit", "search", "slow"):
        assert await stream.create_group(group, "begin")
    ids = await stream.publish_many([{"n": n} for n in range(300)])
    async with anyio.create_task_group() as tg:  # concurrent publishes coalesce
        for n in range(50):
            tg.start_soon(stream.publish, {"n": 300 + n})
    ids = [e.id for e in await _entries(stream)]
    assert len(ids) == 350

    # The slow group holds its first batch and never acks: the others do not wait for it.
    async with stream.consume("slow", prefetch=10) as slow:
        held = await take(slow, 10)
        for group in ("billing", "audit", "search"):
            seen = await handle_all(stream, group, set(ids), consumers=2, prefetch=40)
            assert set(seen) == set(ids)
            assert max(seen.values()) == 1, f"group {group} handled something twice"
        stats = await stream.stats()
        assert stats.groups["slow"].pending == 10
        assert stats.groups["slow"].lag == 340
        for m in held:
            await m.ack()
    stats = await stream.stats()
    for group in ("billing", "audit", "search"):
        assert (stats.groups[group].pending, stats.groups[group].lag) == (0, 0)
    assert stats.length == 350


async def _entries(stream: aioredmq.Stream[Any]) -> list[Envelope]:
    """The stream's envelopes, oldest first."""
    return [decode(fields[b"m"]) for _, fields in await stream_entries(single(stream.client.redis), stream.keys.stream)]


async def test_groups_are_created_idempotently_and_other_errors_surface(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    stream = mq.stream("groups")
    await stream.publish("before")
    assert await stream.create_group("g", "new") is True
    assert await stream.create_group("g", "begin") is False  # exists: keeps its position
    await stream.publish("after")
    async with stream.consume("g") as consumer:
        assert [m.body for m in await take(consumer, 1)] == ["after"]
    async with stream.consume("from-start", start="begin") as consumer:
        assert [m.body for m in await take(consumer, 2)] == ["before", "after"]
    first_id = (await stream_entries(raw, stream.keys.stream))[0][0]
    async with stream.consume("from-id", start=first_id) as consumer:
        assert [m.body for m in await take(consumer, 1)] == ["after"]

    with pytest.raises(aioredmq.ConfigError, match="start="):
        stream.consume("bad", start="yesterday")
    await raw.rpush(mq.stream("wrong").keys.stream, "a list")
    with pytest.raises(aioredmq.WrongTypeError):
        await mq.stream("wrong").create_group("g")
    with pytest.raises(aioredmq.WrongTypeError):
        async with mq.stream("wrong").consume("g"):
            pass


# -- recovery ----------------------------------------------------------------------------


@pytest.mark.fault
async def test_sigkilled_consumer_entries_are_recovered_after_the_lease(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stream = mq.stream("crash", lease_s=0.5)
    await stream.create_group("workers", "begin")
    ids = await stream.publish_many([{"n": n} for n in range(400)])
    options = ("--group", "workers", "--name", "doomed", "--lease-s", "0.5", "--concurrency", "8", "--prefetch", "50")
    handler = "tests.workers:crash_handler"
    async with worker_process(tmp_path, redis_url, handler, "crash", *options, source="--stream") as proc:
        await poll(listed_at_least(proc, raw, STARTED, 40, tmp_path), 20, "the worker to start handling")
        proc.send_signal(signal.SIGKILL)
        assert await wait_exit(proc, 10, tmp_path) == -signal.SIGKILL

    held = await pending_ids(raw, stream, "workers")
    assert held, "the worker held nothing when it was killed"
    assert {owner for owner, _ in held.values()} == {"doomed"}, held
    started = {i for i, _ in await records(raw, STARTED)}
    by_entry = {entry_id: decode(fields[b"m"]).id for entry_id, fields in await stream_entries(raw, stream.keys.stream)}
    held_ids = {by_entry[e] for e in held}
    assert held_ids & started, "no handler was running when the worker was killed"
    acked = started - held_ids

    recovered: dict[str, int] = {}

    async def handler_fn(msg: aioredmq.Message[Any]) -> None:
        recovered[msg.id] = msg.deliveries

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(stream, handler_fn, group="workers", concurrency=8, name="rescuer"))
        await wait_for(lambda: set(ids) - acked <= recovered.keys(), 20, "the rescuer to handle the rest")
        tg.cancel_scope.cancel()
    assert set(ids) <= acked | recovered.keys(), "a message was lost"
    assert all(recovered[i] == 2 for i in held_ids), {i: recovered[i] for i in held_ids}
    assert all(recovered[i] == 1 for i in set(recovered) - held_ids)
    stats = await stream.stats()
    assert (stats.groups["workers"].pending, stats.groups["workers"].lag) == (0, 0)
    report(
        "streams: a consumer SIGKILLed mid-batch",
        len(ids),
        faults=f"SIGKILL holding {len(held)} pending entries (each recovered once, delivery 2)",
    )


async def test_a_restarted_consumer_resumes_its_own_pending_entries_first(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    stream = mq.stream("resume", lease_s=30)
    await stream.create_group("g", "begin")
    ids = await stream.publish_many(list(range(15)))
    # A previous life of "w1" read five entries and died without acking.
    await raw.xreadgroup("g", "w1", {stream.keys.stream: ">"}, count=5)
    got: list[aioredmq.Message[Any]] = []
    async with stream.consume("g", name="w1", prefetch=4) as consumer:
        while len(got) < 15:
            got += await take(consumer, 1)
            await got[-1].ack()
    assert [m.id for m in got] == ids, "its own pending entries first, then the new ones, in order"
    assert [m.deliveries for m in got] == [2] * 5 + [1] * 10
    assert consumer.stats.claimed == 0  # resumed at once, not recovered after a lease
    stats = await stream.stats()
    assert (stats.groups["g"].pending, stats.groups["g"].consumers) == (0, {})


async def test_a_poison_entry_is_dead_lettered_and_the_rest_flow(mq: aioredmq.Client) -> None:
    stream = mq.stream("poison", retry=FAST_RETRY)
    await stream.create_group("g", "begin")
    ids = await stream.publish_many([{"n": n, "poison": n == 7} for n in range(30)])
    handled: Counter[str] = Counter()
    attempts: list[int] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        if msg.body["poison"]:
            attempts.append(msg.deliveries)
            raise ValueError("cannot handle this one")
        handled[msg.id] += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(stream, handler, group="g", concurrency=4))
        await wait_for(lambda: len(handled) == 29 and len(attempts) == 3, what="29 handled and 3 poison attempts")
        tg.cancel_scope.cancel()
    assert attempts == [1, 2, 3]
    assert max(handled.values()) == 1
    (record,) = await stream.dead_letters("g")
    envelope = record.envelope
    assert envelope is not None
    assert envelope.id == ids[7]
    assert "ValueError: cannot handle this one" in record.reason
    assert "delivered 3 times" in record.reason
    stats = await stream.stats()
    assert (stats.groups["g"].pending, stats.groups["g"].dead) == (0, 1)


@pytest.mark.fault
async def test_an_entry_whose_consumers_keep_dying_is_dead_lettered_by_the_sweep(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    stream = mq.stream("dying", lease_s=0.3, retry=FAST_RETRY)
    await stream.create_group("g", "begin")
    (msg_id,) = await stream.publish_many(["x"])
    key = stream.keys.stream
    # Three consumers took it and died: three deliveries, no ack.
    await raw.xreadgroup("g", "ghost", {key: ">"})
    entry_id = (await stream_entries(raw, key))[0][0]
    for ghost in ("ghost2", "ghost3"):
        await raw.xclaim(key, "g", ghost, 0, [entry_id])
    assert [n for _, n in (await pending_ids(raw, stream, "g")).values()] == [3]
    async with stream.consume("g") as consumer:
        await wait_for(lambda: consumer.stats.dead_lettered == 1, what="the sweep to dead-letter it")
    (record,) = await stream.dead_letters("g")
    assert record.envelope is not None
    assert record.envelope.id == msg_id
    assert "delivered 3 times without an ack" in record.reason
    assert await pending_ids(raw, stream, "g") == {}
    report("streams: an entry whose consumers keep dying (delivery-count cap)", 1, dead=1,
           faults="3 deliveries, none acked: dead-lettered by the sweep")  # fmt: skip


async def test_a_handler_three_times_slower_than_the_lease_is_never_robbed(mq: aioredmq.Client) -> None:
    stream = mq.stream("slow", lease_s=0.3)
    await stream.create_group("g", "begin")
    ids = await stream.publish_many(list(range(4)))
    started: list[str] = []
    seen: list[tuple[str, int]] = []

    async def slow(msg: aioredmq.Message[Any]) -> None:
        started.append(msg.id)
        await anyio.sleep(0.9)
        seen.append((msg.id, msg.deliveries))

    async def idle_rival() -> None:  # sweeps for idle entries the whole time
        async with stream.consume("g", name="rival") as rival:
            async for msg in rival:
                seen.append((msg.id, -1))
                await msg.ack()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(stream, slow, group="g", concurrency=4, name="worker"))
        await wait_for(lambda: len(started) == 4, 10, "the worker to start every handler")
        tg.start_soon(idle_rival)
        await wait_for(lambda: len(seen) >= 4, 10, "the slow handlers")
        await anyio.sleep(0.5)  # room for a wrongful redelivery to show up
        tg.cancel_scope.cancel()
    assert sorted(seen) == sorted((i, 1) for i in ids), "redelivered or stolen while a live handler ran"


async def test_closing_returns_unstarted_entries_with_their_count_unchanged(mq: aioredmq.Client) -> None:
    stream = mq.stream("close", lease_s=0.3)
    await stream.create_group("g", "begin")
    ids = await stream.publish_many(list(range(20)))
    async with stream.consume("g", prefetch=20, name="first") as first:
        await wait_for(lambda: first.held == 20, what="a full prefetch")
        done = await take(first, 2)
        for m in done:
            await m.ack()
        cancelled = await take(first, 1)  # handed out, never settled: a delivery that did not finish
    assert first.stats.returned == 18
    seen: dict[str, int] = {}
    async with stream.consume("g", name="second") as second:
        for m in await take(second, 18):
            seen[m.id] = m.deliveries
            await m.ack()
    assert seen.keys() == set(ids[2:])
    assert seen.pop(cancelled[0].id) == 2
    assert set(seen.values()) == {1}, "an unstarted entry came back with a raised delivery count"
    assert (await stream.stats()).groups["g"].pending == 0


async def test_a_nack_delivers_again_after_the_backoff_to_the_same_consumer(mq: aioredmq.Client) -> None:
    stream = mq.stream("nack", lease_s=0.3)
    await stream.create_group("g", "begin")
    await stream.publish("again")
    async with stream.consume("g") as consumer:
        (first,) = await take(consumer, 1)
        await first.nack(delay_s=0.5)  # longer than the lease: renewed while it waits
        (second,) = await take(consumer, 1)
        assert (second.id, second.deliveries) == (first.id, 2)
        await second.ack()
    assert consumer.stats.claimed == 0
    assert (await stream.stats()).groups["g"].pending == 0


# -- bad input, dead letters ---------------------------------------------------------------


async def test_foreign_and_undecodable_entries_are_dead_lettered(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    stream = mq.stream("foreign")
    await stream.create_group("g", "begin")
    await raw.xadd(stream.keys.stream, {"event": "signup"})
    await raw.xadd(stream.keys.stream, {"m": "amq1 not an envelope"})
    good = await stream.publish("fine")
    async with stream.consume("g") as consumer:
        (msg,) = await take(consumer, 1)
        assert msg.id == good
        await msg.ack()
    reasons = sorted(r.reason for r in await stream.dead_letters("g"))
    assert reasons[0].startswith("not an aioredmq entry")
    assert reasons[1].startswith("undecodable")
    assert (await stream.dead_letters("g"))[0].raw == b"event=signup"
    assert (await stream.stats()).groups["g"].pending == 0


async def test_requeued_dead_letters_go_to_their_group_only(mq: aioredmq.Client) -> None:
    stream = mq.stream("requeue")
    for group in ("a", "b"):
        await stream.create_group(group, "begin")
    msg_id = await stream.publish({"x": 1})
    async with stream.consume("a") as consumer:
        (msg,) = await take(consumer, 1)
        await msg.dead_letter("not now")
    assert await stream.requeue_dead("a") == 1
    assert await stream.dead_letters("a") == []
    async with stream.consume("a") as consumer:
        (again,) = await take(consumer, 1)
        assert (again.id, again.deliveries, again.body) == (msg_id, 1, {"x": 1})
        await again.dead_letter("still not")
    assert await stream.purge_dead("a", ["some-other-id"]) == 0
    assert await stream.purge_dead("a", [msg_id]) == 1
    async with stream.consume("b") as consumer:  # b sees the original once, not the requeue
        (original,) = await take(consumer, 1)
        await original.ack()
        with anyio.move_on_after(0.5):
            extra = await consumer.__anext__()
            raise AssertionError(f"group b received the requeue meant for a: {extra}")
    stats = await stream.stats()
    assert (stats.groups["b"].pending, stats.groups["b"].lag) == (0, 0)


# -- retention and trimming ----------------------------------------------------------------


async def test_ack_aware_retention_keeps_what_a_lagging_group_has_not_acked(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    stream = mq.stream("retain", trim_acked=True)
    for group in ("fast", "lagging"):
        await stream.create_group(group, "begin")
    ids = await stream.publish_many(list(range(100)))
    await handle_all(stream, "fast", set(ids))
    async with stream.consume("lagging", prefetch=40) as lagging:
        first = await take(lagging, 40)
        for m in first[:30]:
            await m.ack()
        acked_refs = {m._ref.decode() for m in first[:30]}

        async def acks_landed() -> bool:
            return not acked_refs & (await pending_ids(raw, stream, "lagging")).keys()

        await poll(acks_landed, 10, "the 30 acks to reach Redis")
        assert await stream.trim() == 0
        kept = [e.id for e in await _entries(stream)]
        assert kept == ids[30:], "trimmed an entry the lagging group had not acked, or kept acked ones"
        for m in first[30:]:
            await m.ack()
    await handle_all(stream, "lagging", set(ids[40:]))
    last = await stream.publish(100)
    assert [e.id for e in await _entries(stream)] == [last]
    assert (await stream.stats()).dropped_unacked == 0


async def test_a_hard_cap_drops_unacked_entries_and_counts_them(
    mq: aioredmq.Client, caplog: pytest.LogCaptureFixture
) -> None:
    stream = mq.stream("capped", trim_acked=True, maxlen=50)
    await stream.create_group("g", "begin")
    with caplog.at_level(logging.WARNING, logger="aioredmq.producer"):
        await stream.publish_many(list(range(120)))
    stats = await stream.stats()
    assert stats.length == 50
    assert stats.dropped_unacked == 70
    assert "dropped 70 entries that some group had not acked" in caplog.text
    seen = await handle_all(stream, "g", {e.id for e in await _entries(stream)})
    assert len(seen) == 50


@pytest.mark.fault
async def test_approximate_trimming_and_entries_trimmed_while_pending_are_counted(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    stream = mq.stream("trimmed", lease_s=0.3, maxlen=10)
    await stream.create_group("g", "begin")
    await stream.publish_many(list(range(5)))
    await raw.xreadgroup("g", "ghost", {stream.keys.stream: ">"})  # pending with a dead consumer
    await raw.xtrim(stream.keys.stream, maxlen=0)  # deleted before anyone acked them
    await stream.publish_many(list(range(1000)))
    assert await raw.xlen(stream.keys.stream) < 1000  # MAXLEN ~ 10 trims whole nodes
    async with stream.consume("g", name="live") as consumer:
        await wait_for(lambda: consumer.stats.trimmed == 5, what="the sweep to find the trimmed entries")
    assert "ghost" not in {owner for owner, _ in (await pending_ids(raw, stream, "g")).values()}
    report("streams: pending entries trimmed away before their ack", 5,
           faults="XTRIM deleted 5 pending entries (retention chose to): acked, counted, none stuck")  # fmt: skip


async def test_idle_consumers_holding_nothing_are_removed(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    stream = mq.stream("idle", lease_s=0.3)
    await stream.create_group("g", "begin")
    await stream.publish("x")
    await raw.xreadgroup("g", "ghost", {stream.keys.stream: ">"})
    await raw.xack(stream.keys.stream, "g", (await stream_entries(raw, stream.keys.stream))[0][0])  # holds nothing
    assert (await stream.stats()).groups["g"].consumers["ghost"].pending == 0
    await anyio.sleep(0.3)
    async with stream.consume("g", name="live", forget_idle_consumers_s=0.2) as consumer:

        async def ghost_gone() -> bool:
            return "ghost" not in (await stream.stats()).groups["g"].consumers

        await poll(ghost_gone, 10, "the idle consumer to be removed")
        await stream.publish("y")
        (y,) = await take(consumer, 1)
        assert y.body == "y"
        assert (await stream.stats()).groups["g"].consumers["live"].pending == 1
        await y.ack()
    assert (await stream.stats()).groups["g"].consumers == {}  # a clean close leaves the group


# -- publishing ----------------------------------------------------------------------------


async def test_a_resent_stream_batch_is_applied_once(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    from aioredmq.scripts import script

    stream = mq.stream("dedupe")
    keys = (stream.keys.stream, stream.keys.producer("p"), stream.keys.dropped)
    args = (1, 60_000, 0, 0, 0, b"one", b"two")
    assert await script("xpublish")(mq.redis, keys, args) == [2, 0]
    assert await script("xpublish")(mq.redis, keys, args) == [-1, 0]
    assert await raw.xlen(stream.keys.stream) == 2


async def test_stream_settings_conflict_and_validation(mq: aioredmq.Client) -> None:
    stream = mq.stream("cfg", maxlen=100)
    assert mq.stream("cfg", maxlen=100) is stream
    with pytest.raises(aioredmq.ConfigError, match="already open"):
        mq.stream("cfg", maxlen=200)
    with pytest.raises(aioredmq.ConfigError, match="maxlen"):
        mq.stream("cfg2", maxlen=0)
    with pytest.raises(aioredmq.ConfigError, match="group"):
        stream.consume("has space")
    with pytest.raises(aioredmq.ConfigError, match="applies to streams"):
        await mq.run(mq.queue("q"), _noop, group="g")


async def _noop(msg: aioredmq.Message[Any]) -> None:
    pass


async def test_a_consumer_reads_replies_as_resp3_sends_them(redis_url: str) -> None:
    """The read connection takes XREADGROUP replies as the server sends them: a map under RESP3."""
    async with aioredmq.connect(f"{redis_url}?protocol=3") as mq:
        stream = mq.stream("resp3")
        await stream.create_group("g", "begin")
        await stream.publish_many([{"n": i} for i in range(5)])
        got: list[int] = []
        async with stream.consume("g", block_s=0.2) as consumer:
            async for msg in consumer:
                got.append(msg.body["n"])
                await msg.ack()
                if len(got) == 5:
                    break
        assert got == [0, 1, 2, 3, 4]
        assert (await stream.stats()).groups["g"].pending == 0
