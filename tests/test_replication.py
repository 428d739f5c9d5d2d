"""Opt-in replicated durability: a publish that waits for N replicas (WAIT), against a
real master and replica."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import anyio
import pytest

import aioredmq
from aioredmq.envelope import decode, encode
from aioredmq.ids import new_id
from aioredmq.scripts import script
from aioredmq.testing import RedisServer

from .helpers import wait_for
from .ledger import report
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as master:
        replica = RedisServer("--replicaof", "127.0.0.1", str(master.port), "--repl-diskless-sync-delay", "0")
        with replica:
            deadline = time.monotonic() + 10
            while _link(replica) != "up":
                assert time.monotonic() < deadline, "the replica never linked to its master"
                time.sleep(0.05)
            yield master, replica


def _link(server: RedisServer) -> str | None:
    return server.info("replication").get("master_link_status")


async def test_a_publish_waits_for_its_replicas_or_says_it_could_not(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = replicated
    async with aioredmq.connect(master.url) as mq:
        q = mq.queue("durable")
        await q.publish({"n": 1}, replicas=1)  # the replica has it when this returns
        assert len(await q.publish_many([{"n": i} for i in range(2, 50)], replicas=1, replica_timeout_s=2)) == 48
        with pytest.raises(aioredmq.NotReplicatedError) as too_many:
            await q.publish({"n": 50}, replicas=2, replica_timeout_s=0.2)
        assert too_many.value.replicated == 1
        replica.kill(signal.SIGSTOP)  # it stops acknowledging
        try:
            with pytest.raises(aioredmq.NotReplicatedError, match="only 0 of 1 replica"):
                await q.publish({"n": 51}, replicas=1, replica_timeout_s=0.2)
            # A WAIT may block longer than the socket timeout: its reply is awaited that long.
            async with aioredmq.connect(master.url, socket_timeout_s=0.2) as impatient:
                with pytest.raises(aioredmq.NotReplicatedError, match="within 600 ms"):
                    await impatient.queue("durable").publish({"n": 52}, replicas=1, replica_timeout_s=0.6)
        finally:
            replica.kill(signal.SIGCONT)
        # Not replicated in time is not lost: the messages are in Redis and delivered.
        assert (await q.stats()).ready == 52
        with pytest.raises(aioredmq.ConfigError):
            await q.publish({"n": 53}, replicas=-1)
        pq = mq.partitioned("durable-p", partitions=4)
        await pq.publish({"n": 1}, key="a", replicas=1)
        assert len(await pq.publish_many([(k, {"n": 2}) for k in "abcdef"], replicas=1)) == 6
        # One error as it is (not an exception group), though several partitions failed.
        with pytest.raises(aioredmq.NotReplicatedError):
            await pq.publish_many([(k, {"n": 3}) for k in "abcdef"], replicas=2, replica_timeout_s=0.1)
        with pytest.raises(aioredmq.ConfigError):
            await pq.publish_many([("a", {"n": 4})], replicas=-1)


@pytest.mark.fault
async def test_a_replica_cut_off_before_a_failover_loses_only_what_replicas_0_confirmed() -> None:
    """The loss window without ``replicas``: the replica's link is partitioned (a proxy
    stops forwarding), the master goes on confirming writes, then it dies and the replica
    is promoted. Everything confirmed since the cut is gone, however fast the failover;
    publishes with ``replicas=1`` were refused meanwhile (NotReplicatedError), so none of
    theirs is."""
    with RedisServer() as master:
        async with FaultProxy("127.0.0.1", master.port) as link:
            replica = RedisServer("--replicaof", "127.0.0.1", str(link.port), "--repl-diskless-sync-delay", "0")
            with replica:
                await wait_for(lambda: _link(replica) == "up", 10, "the replica to link through the proxy")
                confirmed: dict[str, set[int]] = {"w-fast": set(), "w-durable": set()}
                sent_after_cut: set[int] = set()  # of replicas=0: sent once the link was cut
                refused = 0
                counter = iter(range(10**9))
                async with aioredmq.connect(master.url, socket_timeout_s=1.0) as mq:

                    async def publish(name: str, replicas: int) -> bool:
                        batch = [next(counter) for _ in range(20)]
                        after_cut = link.paused
                        try:
                            await mq.queue(name).publish_many(batch, replicas=replicas, replica_timeout_s=0.05)
                        except aioredmq.NotReplicatedError:
                            return False
                        confirmed[name].update(batch)
                        if after_cut:
                            sent_after_cut.update(batch)
                        return True

                    for _ in range(20):
                        assert await publish("w-fast", 0)
                        assert await publish("w-durable", 1)
                    cut = anyio.Event()

                    async def load(name: str, replicas: int) -> None:
                        nonlocal refused
                        while not cut.is_set():
                            refused += not await publish(name, replicas)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(load, "w-fast", 0)
                        tg.start_soon(load, "w-durable", 1)
                        await anyio.sleep(0.2)
                        link.pause()  # the partition: the replica hears nothing more
                        cut_at = time.monotonic()
                        await anyio.sleep(0.5)
                        cut.set()
                    cut_s = time.monotonic() - cut_at
                    master.kill(signal.SIGKILL)
                async with aioredmq.connect(replica.url) as promoted:
                    await promoted.redis.execute_command("REPLICAOF", "NO", "ONE")  # what a failover does
                    kept = {name: {int(b) for b in await _bodies(promoted, name)} for name in confirmed}
    lost = {name: confirmed[name] - kept[name] for name in confirmed}
    rate = len(sent_after_cut) / cut_s
    in_flight = lost["w-fast"] - sent_after_cut
    report(
        "replication link cut 0.5 s before the master dies: replicas=1 (replicas=0 beside it)",
        len(confirmed["w-durable"]),
        lost=len(lost["w-durable"]),
        faults=f"partition, SIGKILL, promotion; {refused} replicas=1 batches refused during the cut. "
        f"replicas=0 lost {len(lost['w-fast'])} of {len(confirmed['w-fast'])}: all it sent in the "
        f"{cut_s:.2f} s after the cut (at {rate:,.0f} msg/s) and {len(in_flight)} in flight at the cut",
    )
    assert not lost["w-durable"], f"publishes a replica acknowledged were lost: {sorted(lost['w-durable'])[:20]}"
    assert refused > 0, "the cut must have refused replicas=1 publishes, or it tested nothing"
    assert sent_after_cut <= lost["w-fast"], "a replica cut off cannot have what was sent after the cut"


async def _bodies(mq: aioredmq.Client, name: str) -> list[bytes]:
    """The bodies of every message in a queue's ready list (JSON integers here)."""
    raws: list[bytes] = await mq.redis.execute_command("LRANGE", mq.queue(name).keys.ready, 0, -1)
    return [decode(raw).body for raw in raws]


async def test_a_wait_cancelled_mid_reply_leaves_no_stale_reply_in_the_pool(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    """The script and its WAIT are read by hand; cancelled while WAIT blocks, the
    connection must be dropped, or the next command on it would read WAIT's late reply."""
    master, replica = replicated
    async with aioredmq.connect(master.url, max_connections=1) as mq:
        keys = mq.queue("durable-cancel").keys
        publish = script("publish")
        args = (1, 60_000, encode(new_id(), 1, 2, "json", None, b"1"))
        replica.kill(signal.SIGSTOP)  # WAIT blocks for its whole timeout
        try:
            with anyio.move_on_after(0.2) as scope:
                await publish.call_and_wait(mq.redis, (keys.ready, keys.producer("p")), args, 1, 1000)
            assert scope.cancelled_caught
            await anyio.sleep(1.0)  # WAIT's reply would have arrived by now
            assert await mq.redis.execute_command("PING") is True  # the one pooled connection is fresh
            assert await mq.redis.execute_command("LLEN", keys.ready) == 1
        finally:
            replica.kill(signal.SIGCONT)


async def test_a_master_that_stalls_during_a_replicated_publish_leaves_no_stale_reply(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    """A read that outlasts its timeout must drop the connection: the replies still on
    their way would otherwise answer the next command sent on it. The publish resends
    (under its sequence number) once the master is back, and is applied once."""
    master, _ = replicated
    async with aioredmq.connect(master.url, socket_timeout_s=0.2, max_connections=1) as mq:
        q = mq.queue("durable-stall")
        assert await mq.redis.execute_command("PING") is True  # the pool's one connection is open
        master.kill(signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: q.publish({"n": 1}, replicas=1, replica_timeout_s=0.2))
                await anyio.sleep(0.8)  # the first try's reads time out meanwhile
                master.kill(signal.SIGCONT)
        finally:
            master.kill(signal.SIGCONT)
        assert await mq.redis.execute_command("PING") is True
        assert (await q.stats()).ready == 1
