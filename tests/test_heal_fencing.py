"""Recovery that does not depend on the lease entries surviving, and fenced partitions.

* In-flight lists are found through the queue's registry, whether or not a consumer's
  lease entry exists (evicted, lost with its key, or forgotten by a forced reap).
* A partition's holder carries a fencing token: once another member holds the partition,
  the old holder can no longer take or settle there, so one key never runs twice at once.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq
from aioredmq.consumer import Consumer

from .helpers import wait_for
from .ledger import Ledger
from .test_crash import poll

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

LEASE_S = 0.6


async def kill(consumer: Consumer[Any]) -> None:
    """As a SIGKILL leaves it: the tasks stop, nothing is given back, nothing deregistered."""
    consumer._state = 2
    await consumer._tasks.aclose()
    consumer._due.close()
    consumer.client.consumers.discard(consumer)
    if consumer._conn is not None:
        await consumer.client.release_dedicated(consumer._conn)


async def drain_into(ledger: Ledger, consumer: Consumer[Any], queue: aioredmq.Queue[Any], timeout_s: float) -> None:
    async def serve() -> None:
        async for msg in consumer:
            async with msg.process():
                ledger.done(msg.body["n"], msg.deliveries)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await poll(ledger.drained(queue), timeout_s, "the queue drained")
        tg.cancel_scope.cancel()


async def test_in_flight_list_recovered_when_its_lease_entry_is_lost(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    queue = mq.queue("lost-lease", lease_s=LEASE_S)
    ledger = Ledger("in-flight list of a killed consumer whose lease entry was lost")
    await queue.publish_many([{"n": n} for n in range(20)])
    ledger.published(range(20))
    doomed = queue.consume(prefetch=20)
    await doomed.__aenter__()
    await wait_for(lambda: doomed.held == 20, what="the consumer holds all 20")
    await kill(doomed)
    await raw.delete(queue.keys.leases)
    ledger.fault("consumer killed holding 20; the leases key deleted (evicted)", timed=True)
    async with queue.consume(prefetch=50) as survivor:
        await drain_into(ledger, survivor, queue, timeout_s=10 * LEASE_S + 5)
    result = await ledger.check(raw, queue, duplicates_explained=True)
    assert result.lost == 0


async def test_late_move_after_a_forced_reap_is_still_recovered(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    """A forced reap (a partition taken over) forgets the old holder's lease at once; a
    blocking move of the old holder that lands afterwards, before it dies, must still be
    found by a later reap."""
    queue = mq.queue("late-move", lease_s=LEASE_S)
    ledger = Ledger("a blocking move landing after a forced reap, then the old holder dies")
    old = queue.consume(prefetch=10)
    await old.__aenter__()
    await kill(old)
    async with queue.consume(prefetch=50) as survivor:
        await survivor._reap_expired([old.name.encode()], force=True)
        assert await raw.zscore(queue.keys.leases, old.name) is None, "a forced reap forgets the lease"
        # The old holder's BLMOVE, issued before the takeover, lands now. (The envelope is
        # made in another queue, so the survivor's own fetch cannot take it first.)
        staging = mq.queue("late-move-staging")
        await staging.publish({"n": 0})
        ledger.published([0])
        await raw.lmove(staging.keys.ready, queue.keys.inflight(old.name), "RIGHT", "LEFT")
        assert await raw.llen(queue.keys.inflight(old.name)) == 1
        ledger.fault("a late move into a force-reaped consumer's list", timed=True)
        await drain_into(ledger, survivor, queue, timeout_s=10 * LEASE_S + 5)
    result = await ledger.check(raw, queue, duplicates_explained=True)
    assert result.lost == 0


async def test_a_reaped_list_consumer_drops_what_it_had_not_handed_out(
    mq: aioredmq.Client, raw: aioredis.Redis
) -> None:
    """A live consumer whose lease lapsed (a stall) and was reaped learns so from its next
    heartbeat: what it had fetched but not handed out is dropped, not run a second time."""
    queue = mq.queue("reaped-alive", lease_s=1.5)
    ledger = Ledger("a live list consumer reaped after its lease lapsed")
    await queue.publish_many([{"n": n} for n in range(20)])
    ledger.published(range(20))
    async with queue.consume(prefetch=20, name="stalled") as stalled:
        await wait_for(lambda: stalled.held == 20, what="the consumer holds all 20")
        first = await stalled.__anext__()  # handed out: its handler runs through the stall
        async with queue.consume(prefetch=50, name="survivor") as survivor:
            # As a stall past the lease leaves it: the lease lapsed, a reap took all 20 back.
            while True:
                await raw.zadd(queue.keys.leases, {"stalled": 1})
                if await survivor._reap_expired([b"stalled"]) == 0:
                    break
            ledger.fault("a live consumer's lease lapsed and it was reaped", timed=True, until_any=True)
            await wait_for(lambda: stalled.held == 1, what="the reaped consumer dropped the 19 it had not handed out")
            async with first.process():
                ledger.done(first.body["n"], first.deliveries)  # late: it was recovered meanwhile
            await drain_into(ledger, survivor, queue, timeout_s=10)
    result = await ledger.check(raw, queue, duplicates_explained=True)
    assert result.lost == 0
    assert result.duplicated == 1, "only the message already handed out ran twice"


class KeyWatch:
    """Handlings of one key's messages across members: overlaps and starts out of order."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.running = 0
        self.overlaps = 0
        self.out_of_order: list[int] = []
        self.completed: set[int] = set()
        self.by_member: dict[str, int] = {}

    async def handle(self, member: str, msg: aioredmq.Message[Any], hold_s: float = 0.03) -> None:
        """``n`` is the ledger's number; ``i`` (default ``n``) the place in the key's order."""
        n = msg.body["n"]
        i = msg.body.get("i", n)
        if i and i - 1 not in self.completed:
            self.out_of_order.append(i)
        self.running += 1
        self.overlaps += self.running > 1
        try:
            await anyio.sleep(hold_s)
        finally:
            self.running -= 1
        self.completed.add(i)
        self.by_member[member] = self.by_member.get(member, 0) + 1
        self.ledger.done(n, msg.deliveries)


def serve(tg: anyio.abc.TaskGroup, member: aioredmq.PartitionedConsumer[Any], watch: KeyWatch) -> None:
    async def work() -> None:
        async for msg in member:
            async with msg.process():
                await watch.handle(member.name, msg)

    for _ in range(4):
        tg.start_soon(work)


@pytest.mark.slow
async def test_partition_keys_lost_two_live_members_never_overlap(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    pq = mq.partitioned("fenced", partitions=1, lease_s=1.0)
    part = pq.partitions[0]
    ledger = Ledger("partitioned: hold and lease keys lost, two live members")
    watch = KeyWatch(ledger)
    await pq.publish_many([("k", {"n": n}) for n in range(60)])
    ledger.published(range(60))
    first = pq.consume(prefetch=20, name="b-old")
    second = pq.consume(prefetch=20, name="a-new")
    async with anyio.create_task_group() as tg:
        await first.__aenter__()
        serve(tg, first, watch)
        await wait_for(lambda: len(watch.completed) >= 5, what="the first member is consuming")
        k = pq.keys
        await raw.delete(k.holders, k.holds, k.members, part.keys.leases)
        ledger.fault("holders, holds, members and the partition's leases deleted", timed=True, until_any=True)
        await second.__aenter__()  # finds partition 0 free and takes it
        assert second.held_partitions == [0]
        serve(tg, second, watch)
        await poll(ledger.drained(part), 30, "the partition drained")
        tg.cancel_scope.cancel()
    await first.aclose()
    await second.aclose()
    assert watch.overlaps == 0, f"{watch.overlaps} handling(s) of key k ran beside another"
    assert not watch.out_of_order, f"started before the previous one finished: {watch.out_of_order[:5]}"
    assert watch.by_member.get("a-new"), "the second member took over"
    result = await ledger.check(raw, part, duplicates_explained=True)
    assert result.lost == 0


async def test_closing_the_client_closes_its_partitioned_members(redis_url: str, mq: aioredmq.Client) -> None:
    """A member left open when its client closes stops renewing its holds and leaves, so
    another member gets its partitions at once."""
    gone = aioredmq.connect(redis_url)
    await gone.__aenter__()
    left_open = gone.partitioned("closing", partitions=4, lease_s=30.0).consume(name="left-open")
    await left_open.__aenter__()
    assert left_open.held_partitions == [0, 1, 2, 3]
    await gone.aclose()
    assert left_open.closed
    async with mq.partitioned("closing", partitions=4, lease_s=30.0).consume(name="other") as other:
        assert other.held_partitions == [0, 1, 2, 3], "the closed client's member left"


class KeyWatches:
    """One key per partition, a :class:`KeyWatch` per key, and members run by ``mq.run()``.
    The first delivery of each key's first message is slow; its cancellation is recorded."""

    def __init__(self, pq: aioredmq.PartitionedQueue[Any], what: str, slow_s: float = 20.0) -> None:
        self.pq = pq
        self.ledger = Ledger(what)
        by_partition: dict[int, str] = {}
        for n in range(1000):
            by_partition.setdefault(pq.partition_of(f"k{n}"), f"k{n}")
        self.keys = [by_partition[i] for i in range(len(pq.partitions))]
        self.slow_s = slow_s
        self.watches = {key: KeyWatch(self.ledger) for key in self.keys}
        self.cancelled: dict[str, str] = {}  # key -> the member whose slow handler was cancelled

    async def publish(self, per_key: int) -> None:
        items = [(k, {"k": k, "i": i, "n": j * per_key + i}) for j, k in enumerate(self.keys) for i in range(per_key)]
        await self.pq.publish_many(items)
        self.ledger.published(range(len(items)))

    def start(self, tg: anyio.abc.TaskGroup, member: str) -> None:
        tg.start_soon(
            lambda: self.pq.client.run(self.pq, self.handler(member), name=member, grace_s=0.3, concurrency=4)
        )

    def handler(self, member: str) -> Any:
        async def handle(msg: aioredmq.Message[Any]) -> None:
            key = msg.body["k"]
            slow = msg.body["i"] == 0 and msg.deliveries == 1
            try:
                await self.watches[key].handle(member, msg, self.slow_s if slow else 0.01)
            except anyio.get_cancelled_exc_class():
                self.cancelled[key] = member
                raise

        return handle

    async def drained_and_checked(self, raw: aioredis.Redis) -> None:
        for part in self.pq.partitions:
            await poll(self.ledger.drained(part), 30, f"{part.name} drained")
        for key, watch in self.watches.items():
            assert watch.overlaps == 0, f"{watch.overlaps} handling(s) of key {key} ran beside another"
            assert not watch.out_of_order, f"{key}: started before the previous one finished: {watch.out_of_order[:5]}"
        for part in self.pq.partitions:
            assert (await self.ledger.check(raw, part, duplicates_explained=True)).lost == 0


@pytest.mark.slow
async def test_hand_over_past_grace_cancels_the_runners_handler(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    """A partition given up in a rebalance waits ``grace_s`` for its running handler, then
    cancels it; the new holder starts the key only after the cancelled handler has ended."""
    pq = mq.partitioned("grace", partitions=2, lease_s=1.0)
    watches = KeyWatches(pq, "partitioned: a rebalance while a handler outlives the grace")
    await watches.publish(per_key=10)
    async with anyio.create_task_group() as tg:
        watches.start(tg, "a")
        await wait_for(lambda: all(w.running for w in watches.watches.values()), what="a runs both slow handlers")
        watches.ledger.fault("a second member joins while a's handlers outlive the grace", timed=True, until_any=True)
        watches.start(tg, "b")
        await wait_for(lambda: len(watches.cancelled) == 1, what="the handed-over handler cancelled")
        await watches.drained_and_checked(raw)
        tg.cancel_scope.cancel()
    (moved,) = watches.cancelled
    assert watches.cancelled[moved] == "a"
    assert watches.watches[moved].by_member.get("b"), "the new holder ran the handed-over key"


@pytest.mark.slow
async def test_a_lost_partition_taken_back_never_runs_a_key_twice(mq: aioredmq.Client, raw: aioredis.Redis) -> None:
    """The hold keys are lost while a handler runs; another member takes the partition, then
    leaves. The first member's handler is cancelled when it learns of the loss, and taking the
    partition back does not start the key's next message beside it."""
    pq = mq.partitioned("retaken", partitions=1, lease_s=1.0)
    watches = KeyWatches(pq, "partitioned: hold keys lost during a handler, the partition taken back")
    await watches.publish(per_key=10)
    async with anyio.create_task_group() as tg:
        watches.start(tg, "a")
        await wait_for(lambda: watches.watches[watches.keys[0]].running == 1, what="a runs the slow handler")
        k = pq.keys
        await raw.delete(k.holders, k.holds, k.members)
        watches.ledger.fault("holders, holds and members deleted while a handler runs", timed=True, until_any=True)
        async with pq.consume(name="b") as intruder:
            assert intruder.held_partitions == [0], "the intruder took the partition (and its fence)"
        await wait_for(lambda: bool(watches.cancelled), what="a's fenced handler cancelled")
        await watches.drained_and_checked(raw)
        tg.cancel_scope.cancel()
    assert watches.cancelled == {watches.keys[0]: "a"}
