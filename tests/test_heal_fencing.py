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


class KeyWatch:
    """Handlings of one key's messages across members: overlaps and starts out of order."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.running = 0
        self.overlaps = 0
        self.out_of_order: list[int] = []
        self.completed: set[int] = set()
        self.by_member: dict[str, int] = {}

    async def handle(self, member: str, msg: aioredmq.Message[Any]) -> None:
        n = msg.body["n"]
        if n and n - 1 not in self.completed:
            self.out_of_order.append(n)
        self.running += 1
        self.overlaps += self.running > 1
        try:
            await anyio.sleep(0.03)
        finally:
            self.running -= 1
        self.completed.add(n)
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
