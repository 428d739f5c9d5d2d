"""Redis Cluster: every transport on a real 6-node cluster (3 masters, 3 replicas), and a
failover in the middle of a run. Marked ``cluster``: ``pytest -m cluster`` selects them."""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

import aioredmq
from aioredmq import ops
from aioredmq.envelope import decode
from aioredmq.keys import channel_name
from aioredmq.testing import RedisClusterServers

from .failover import run_through
from .helpers import wait_for
from .ledger import report

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture
async def cmq(cluster: RedisClusterServers) -> AsyncIterator[aioredmq.Client]:
    async with aioredmq.connect(cluster.url, cluster=True) as client:
        yield client


def _owner(rc: RedisCluster, key: str) -> ClusterNode:
    node = rc.get_node_from_key(key)
    assert node is not None, key
    return node


async def handle_all(mq: aioredmq.Client, source: Any, n: int, **options: Any) -> list[Any]:
    bodies: list[Any] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        bodies.append(msg.body)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(source, handler, **options))
        await wait_for(lambda: len(bodies) >= n, 20, f"{n} messages handled")
        tg.cancel_scope.cancel()
    return bodies


async def test_queue_stream_delayed_and_idempotency_work_on_a_cluster(cmq: aioredmq.Client) -> None:
    assert cmq.cluster
    q = cmq.queue("c-orders", retry=aioredmq.RetryPolicy(max_deliveries=1))
    await q.publish_many([{"n": i} for i in range(50)])
    await q.publish({"n": 50}, delay=0.3)
    assert sorted(b["n"] for b in await handle_all(cmq, q, 51)) == list(range(51))
    stats = await q.stats()
    assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0)

    s = cmq.stream("c-events")
    await s.create_group("billing", "begin")
    await s.publish_many([{"n": i} for i in range(20)])
    assert len(await handle_all(cmq, s, 20, group="billing")) == 20
    assert (await s.stats()).groups["billing"].pending == 0

    once = aioredmq.Idempotency()
    effects = cmq.queue("c-effects")
    await effects.publish({"n": 1})
    async with effects.consume(block_s=0.2) as consumer:
        msg = await consumer.__anext__()
        applied = await once.apply(msg, ("INCR", f"aioredmq:{{c-effects}}:effect:{msg.id}"))
        again = await once.apply(msg, ("INCR", f"aioredmq:{{c-effects}}:effect:{msg.id}"))
    assert (applied, again) == (True, False)


async def test_partitions_spread_over_the_masters_and_keep_key_order(
    cmq: aioredmq.Client, cluster: RedisClusterServers
) -> None:
    pq = cmq.partitioned("c-ledger", partitions=12)
    assert isinstance(cmq.redis, RedisCluster)
    await cmq.redis.initialize()  # the slot map
    owners = Counter(_owner(cmq.redis, p.keys.ready).name for p in pq.partitions)
    assert len(owners) == 3, f"the partitions landed on {dict(owners)}"
    assert min(owners.values()) >= 2, f"uneven: {dict(owners)}"
    report("cluster: 12 partitions over 3 masters", 12, faults=f"distribution {sorted(owners.values())}")
    for key in ("a", "b", "c", "d"):
        for seq in range(10):
            await pq.publish({"key": key, "seq": seq}, key=key)
    bodies = await handle_all(cmq, pq, 40, concurrency=8)
    for key in "abcd":
        assert [b["seq"] for b in bodies if b["key"] == key] == list(range(10))


Source = aioredmq.Queue[Any] | aioredmq.Stream[Any] | aioredmq.PartitionedQueue[Any]


async def _failover_source(mq: aioredmq.Client, kind: str) -> tuple[Source, str, str | None, Callable[[int], bool]]:
    """The source a failover run uses, the key whose master is killed, the stream group,
    and which messages (by number) that master carries."""
    if kind == "queue":
        queue = mq.queue("c-failover", lease_s=2.0)
        return queue, queue.keys.ready, None, lambda n: True
    if kind == "stream":
        stream = mq.stream("c-failover-s", lease_s=2.0)
        await stream.create_group("billing", "begin")
        return stream, stream.keys.stream, "billing", lambda n: True
    partitioned = mq.partitioned("c-failover-p", partitions=4, lease_s=2.0)
    killed = partitioned.partition_of("k0")  # run_through's keys are k0..k7

    def on_killed(n: int) -> bool:
        return partitioned.partition_of(f"k{n % 8}") == killed

    return partitioned, partitioned.partitions[killed].keys.ready, None, on_killed


@pytest.mark.fault
@pytest.mark.parametrize("kind", ["queue", "stream", "partitioned"])
async def test_killing_the_master_of_a_queue_mid_run_resumes_within_5_s(kind: str) -> None:
    with RedisClusterServers() as cluster:
        async with aioredmq.connect(cluster.url, cluster=True, socket_timeout_s=1.0) as mq:
            assert isinstance(mq.redis, RedisCluster)
            await mq.redis.initialize()  # the slot map
            source, key, group, watched = await _failover_source(mq, kind)
            owner = _owner(mq.redis, key)
            (master,) = [s for s in cluster.servers if s.port == owner.port]
            run = await run_through(
                mq,
                source,
                lambda: master.kill(signal.SIGKILL),
                replicas=lambda n: 1 if n < 100 else 0,
                group=group,
                watched=watched,
            )
    durable_lost = sorted(n for n in run.lost if n < 100)
    report(
        f"cluster: the master of a {kind.replace('partitioned', 'partitioned queue')} SIGKILLed mid-run",
        len(run.confirmed),
        lost=len(run.lost),
        recovery_s=run.resumed_s,
        faults=f"master SIGKILL, replica promoted (node timeout 1 s); {len(durable_lost)} lost of the first 100, "
        "sent with replicas=1",
    )
    assert not durable_lost, f"publishes a replica acknowledged were lost: {durable_lost}"
    assert run.resumed_s < 5.0, f"consumption resumed only after {run.resumed_s:.1f} s"


async def test_replicated_durability_waits_for_the_replica_of_the_queues_own_master(
    cmq: aioredmq.Client, cluster: RedisClusterServers
) -> None:
    """WAIT counts the replicas that have the writes of the connection it runs on, so it
    must follow the write to the master that owns the queue. A replica that stops makes
    that queue's publish fail (a WAIT on any other connection would count it at once)
    and leaves a queue on another master alone."""
    assert isinstance(cmq.redis, RedisCluster)
    await cmq.redis.initialize()  # the slot map
    names = [f"c-durable-{i}" for i in range(12)]
    by_master = {_owner(cmq.redis, cmq.queue(n).keys.ready).name: n for n in names}
    assert len(by_master) >= 2, by_master
    stalled_name, other_name = list(by_master.values())[:2]
    stalled_q, other_q = cmq.queue(stalled_name), cmq.queue(other_name)
    for q in (stalled_q, other_q):
        await q.publish({"n": 0}, replicas=1)
        assert len(await q.publish_many([{"n": i} for i in range(1, 20)], replicas=1)) == 19
        with pytest.raises(aioredmq.NotReplicatedError) as too_many:
            await q.publish({"n": 20}, replicas=2, replica_timeout_s=0.1)
        assert too_many.value.replicated == 1  # one replica per master
    owner = _owner(cmq.redis, stalled_q.keys.ready).port
    (server,) = [s for s in cluster.servers if s.info("replication").get("master_port") == str(owner)]
    server.kill(signal.SIGSTOP)  # it stops acknowledging (well inside the 1 s node timeout)
    try:
        with pytest.raises(aioredmq.NotReplicatedError, match="only 0 of 1 replica"):
            await stalled_q.publish({"n": 21}, replicas=1, replica_timeout_s=0.2)
        await other_q.publish({"n": 21}, replicas=1, replica_timeout_s=0.2)
    finally:
        server.kill(signal.SIGCONT)
    await stalled_q.publish({"n": 22}, replicas=1)
    # Not replicated in time is not lost: the message is in Redis.
    assert (await stalled_q.stats()).ready == 23
    stream = cmq.stream("c-durable-s")
    await stream.publish({"n": 1}, replicas=1)
    assert (await stream.stats()).length == 1


async def test_channels_are_sharded_on_a_cluster_and_reach_their_subscribers(
    cmq: aioredmq.Client, cluster: RedisClusterServers
) -> None:
    """SPUBLISH/SSUBSCRIBE by default: a subscription to channels on several masters
    holds one connection per slot and gets each channel's messages."""
    assert await cmq.channels_sharded()
    assert isinstance(cmq.redis, RedisCluster)
    await cmq.redis.initialize()  # the slot map
    names = [f"c-news-{i}" for i in range(6)]
    wires = [channel_name(cmq.prefix, n) for n in names]
    assert len({_owner(cmq.redis, w).name for w in wires}) > 1, "the channels must live on several masters"
    async with cmq.subscribe(*names) as sub, cmq.channel(names[0]).subscribe() as first:
        assert len(sub._links) == len({key_slot(w.encode()) for w in wires})
        received = [await cmq.channel(n).publish({"n": n}) for n in names]
        with anyio.fail_after(5):
            got = [(await sub.__anext__()).channel for _ in names]
            alone = (await first.__anext__()).body
    assert received == [2] + [1] * (len(names) - 1)  # each counts the subscribers of its shard
    assert sorted(got) == sorted(names)
    assert alone == {"n": names[0]}
    with pytest.raises(aioredmq.ConfigError, match="sharded_channels=False"):
        async with cmq.subscribe(patterns=["c-news-*"]):
            pass


async def test_a_cluster_older_than_redis_7_keeps_plain_channels(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sharded pub/sub came with Redis 7.0: on an older cluster the default is plain."""
    async with aioredmq.connect(cluster.url, cluster=True) as mq:
        real_info = mq.redis.info

        async def info_of_6_2(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {**await real_info(*args, **kwargs), "redis_version": "6.2.14"}

        monkeypatch.setattr(mq.redis, "info", info_of_6_2)
        assert not await mq.channels_sharded()
        async with mq.subscribe(patterns=["c-old-*"]) as sub:  # allowed: plain pub/sub
            await mq.channel("c-old-1").publish(1)  # counts the subscribers of one node only
            with anyio.fail_after(5):
                assert (await sub.__anext__()).body == 1


async def test_plain_channels_on_a_cluster_when_asked_for_with_patterns(cluster: RedisClusterServers) -> None:
    """``sharded_channels=False``: plain pub/sub, which reaches every node, so patterns work."""
    plain = aioredmq.connect(cluster.url, cluster=True, sharded_channels=False)
    async with plain as mq, mq.subscribe(patterns=["c-plain-*"]) as by_pattern, mq.subscribe("c-plain-1") as by_name:
        await mq.channel("c-plain-1").publish({"headline": "cluster"})
        with anyio.fail_after(5):
            got = [(await by_pattern.__anext__()).body, (await by_name.__anext__()).body]
    assert got == [{"headline": "cluster"}] * 2


@pytest.mark.fault
async def test_a_sharded_subscription_follows_its_slot_to_the_promoted_replica() -> None:
    with RedisClusterServers() as cluster:
        async with aioredmq.connect(cluster.url, cluster=True, socket_timeout_s=1.0) as mq:
            assert isinstance(mq.redis, RedisCluster)
            await mq.redis.initialize()  # the slot map
            channel = mq.channel("c-alerts")
            owner = _owner(mq.redis, channel_name(mq.prefix, "c-alerts"))
            (master,) = [s for s in cluster.servers if s.port == owner.port]
            async with channel.subscribe() as sub:
                await channel.publish({"n": 0})
                with anyio.fail_after(5):
                    assert (await sub.__anext__()).gap is False
                master.kill(signal.SIGKILL)
                killed_at = time.monotonic()

                async def publish_until_received() -> None:
                    n = 1
                    while True:
                        with contextlib.suppress(aioredmq.AioredmqError):
                            await channel.publish({"n": n})
                        n += 1
                        await anyio.sleep(0.05)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish_until_received)
                    with anyio.fail_after(15):
                        after = await sub.__anext__()
                    tg.cancel_scope.cancel()
                resumed_s = time.monotonic() - killed_at
    report(
        "cluster: the master of a sharded channel SIGKILLed",
        1,
        recovery_s=resumed_s,
        faults=f"master SIGKILL; the subscription resubscribed on the promoted replica "
        f"({sub.stats.reconnects} reconnects, gap flagged)",
    )
    assert after.gap, "the first message after the failover must say some may have been missed"
    assert sub.stats.reconnects >= 1
    assert resumed_s < 5.0, f"the subscription resumed only after {resumed_s:.1f} s"


async def test_stats_find_the_queues_and_streams_on_every_master(cmq: aioredmq.Client) -> None:
    names = [f"c-find-{i}" for i in range(8)]
    for name in names:
        await cmq.queue(name).publish(1)
    await cmq.stream("c-find-s").publish(1)
    assert isinstance(cmq.redis, RedisCluster)
    masters = {_owner(cmq.redis, cmq.queue(n).keys.ready).name for n in names}
    assert len(masters) > 1, "the queues must live on several masters for this to prove anything"
    found = {f.name: f.kind for f in await ops.discover(cmq)}
    assert {n: found.get(n) for n in names} == dict.fromkeys(names, "queue")
    assert found["c-find-s"] == "stream"


@pytest.mark.fault
async def test_the_loss_window_under_write_load_and_none_lost_with_replicas() -> None:
    """Two queues on one master take batches as fast as they can, one with ``replicas=0``
    and one with ``replicas=1``, until that master is SIGKILLed and its replica promoted.
    Every confirmed message of the second must be on the new master; the first's loss is
    the asynchronous-replication window, reported as messages and as milliseconds of its
    publish rate."""
    with RedisClusterServers() as cluster:
        async with aioredmq.connect(cluster.url, cluster=True, socket_timeout_s=1.0) as mq:
            assert isinstance(mq.redis, RedisCluster)
            await mq.redis.initialize()  # the slot map
            names: dict[str, list[str]] = {}
            for i in range(40):
                names.setdefault(_owner(mq.redis, f"{{c-window-{i}}}").name, []).append(f"c-window-{i}")
            fast_name, durable_name = next(n for n in names.values() if len(n) >= 2)[:2]
            fast, durable = mq.queue(fast_name), mq.queue(durable_name)
            owner = _owner(mq.redis, fast.keys.ready)
            (master,) = [s for s in cluster.servers if s.port == owner.port]
            confirmed: dict[str, set[int]] = {fast_name: set(), durable_name: set()}
            counter = iter(range(10**9))
            killed = anyio.Event()
            stop = anyio.Event()

            async def load(q: aioredmq.Queue[Any], replicas: int) -> None:
                while not stop.is_set():
                    batch = [next(counter) for _ in range(50)]
                    try:
                        await q.publish_many(batch, replicas=replicas)
                    except aioredmq.AioredmqError:
                        await anyio.sleep(0.05)  # unconfirmed or not replicated: may or may not exist
                        continue
                    confirmed[q.name].update(batch)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(load, fast, 0)
                    tg.start_soon(load, durable, 1)
                await anyio.sleep(1.0)
                rate = len(confirmed[fast_name]) / 1.0
                master.kill(signal.SIGKILL)
                killed.set()
                before = len(confirmed[fast_name])
                await wait_for(lambda: len(confirmed[fast_name]) > before, 10, "publishes to the promoted replica")
                await anyio.sleep(0.5)
                stop.set()
            kept = {name: {int(raw) for raw in await _bodies(mq, name)} for name in confirmed}
    lost = {name: confirmed[name] - kept[name] for name in confirmed}
    window_ms = 1000 * len(lost[fast_name]) / rate
    report(
        "cluster: master SIGKILLed under write load, replicas=0 beside replicas=1",
        len(confirmed[fast_name]) + len(confirmed[durable_name]),
        lost=len(lost[fast_name]) + len(lost[durable_name]),
        faults=f"replicas=0 lost {len(lost[fast_name])} of {len(confirmed[fast_name])} at {rate:,.0f} msg/s "
        f"(a {window_ms:.1f} ms window); replicas=1 lost {len(lost[durable_name])} of {len(confirmed[durable_name])}",
    )
    assert not lost[durable_name], f"publishes a replica acknowledged were lost: {sorted(lost[durable_name])[:20]}"


async def _bodies(mq: aioredmq.Client, name: str) -> list[bytes]:
    """The bodies of every message in a queue's ready list (JSON integers here)."""
    q = mq.queue(name)
    raws: list[bytes] = await mq.redis.execute_command("LRANGE", q.keys.ready, 0, -1)
    return [decode(raw).body for raw in raws]


async def test_a_sharded_subscription_follows_its_slot_when_it_migrates(
    cmq: aioredmq.Client, cluster: RedisClusterServers
) -> None:
    """Moving a channel's slot to another master makes Redis unsubscribe its shard
    subscribers (SUNSUBSCRIBE); the subscription resubscribes on the new owner."""
    assert isinstance(cmq.redis, RedisCluster)
    await cmq.redis.initialize()  # the slot map
    wire = channel_name(cmq.prefix, "c-moving")
    slot = key_slot(wire.encode())
    source = _owner(cmq.redis, wire)
    target = next(n for n in cmq.redis.get_primaries() if n.name != source.name)
    channel = cmq.channel("c-moving")
    async with channel.subscribe() as sub:
        await channel.publish({"n": 0})
        with anyio.fail_after(5):
            assert (await sub.__anext__()).body == {"n": 0}
        source_id, target_id = [
            await cmq.redis.execute_command("CLUSTER MYID", target_nodes=n) for n in (source, target)
        ]
        # The documented live-resharding order; no key lives in the slot, so nothing needs
        # MIGRATE. The target hears NODE first: it claims the slot with a new config epoch,
        # so gossip cannot hand the slot back to the source.
        await cmq.redis.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id, target_nodes=target)
        await cmq.redis.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id, target_nodes=source)
        others = [n for n in cmq.redis.get_primaries() if n.name not in (source.name, target.name)]
        for node in (target, source, *others):
            await cmq.redis.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id, target_nodes=node)
        await wait_for(lambda: sub.stats.reconnects >= 1, 10, "the subscription to resubscribe")
        received = await channel.publish({"n": 1})
        with anyio.fail_after(5):
            after = await sub.__anext__()
    assert received == 1
    assert after.body == {"n": 1}
    assert after.gap
