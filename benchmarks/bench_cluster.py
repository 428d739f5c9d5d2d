"""Redis Cluster: what cluster routing and replicated durability cost.

    python -m benchmarks.bench_cluster [--messages N] [--rounds R] [--body-bytes B]
                                       [--loop asyncio|uvloop] [--json FILE]

Starts a throwaway 6-node cluster on loopback (3 masters with a replica each, as the
tests do) and a single redis-server beside it. Cases, rounds interleaved:

* publish: ``publish_many`` and 100 concurrent ``publish()`` calls to one queue on the
  cluster, with ``replicas=0`` and with ``replicas=1`` (each batch then waits for the
  queue's replica: WAIT on the connection that wrote it), against redis-py's cluster
  client doing multi-value LPUSH (1,000 values a command) and 100 concurrent LPUSH;
* end to end: the runner (concurrency 64, prefetch 1,024) draining one queue, and a
  partitioned queue of 12 partitions (spread over the three masters), each on the
  cluster and on the single server, so the ratio is what the cluster costs.

Every round checks its result: the queue holds exactly what was published, or every
message was handled and nothing is left ready, in flight or dead. On one machine the
cluster's three masters share its cores with the client: this measures the client's
cost of routing, not the throughput three machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster

import aioredmq
from aioredmq.codecs import get_codec
from aioredmq.testing import RedisClusterServers, RedisServer

from .common import Bench, Case, CaseResult, body_of, environment, finish, options, runner_rate

Connect = Callable[[], aioredmq.Client]
CONCURRENCY, PREFETCH, PARTITIONS = 64, 1024, 12


def publish_case(connect: Connect, n: int, body: dict[str, Any], *, concurrent: bool, replicas: int) -> Case:
    async def case() -> float:
        async with connect() as mq:
            await mq.redis.flushall()
            q = mq.queue("bench")
            t = time.perf_counter()
            if concurrent:
                for _ in range(n // 100):
                    await asyncio.gather(*(q.publish(body, replicas=replicas) for _ in range(100)))
            else:
                await q.publish_many((body for _ in range(n)), replicas=replicas)
            rate = n // 100 * 100 / (time.perf_counter() - t) if concurrent else n / (time.perf_counter() - t)
            assert (await q.stats()).ready == (n // 100 * 100 if concurrent else n)
            return rate

    return case


def raw_publish_case(url: str, n: int, body: dict[str, Any], *, concurrent: bool) -> Case:
    raw = get_codec("json").encode(body)

    async def case() -> float:
        rc = RedisCluster.from_url(url, max_connections=100)
        try:
            await rc.flushall()
            t = time.perf_counter()
            if concurrent:
                for _ in range(n // 100):
                    await asyncio.gather(*(rc.lpush("raw", raw) for _ in range(100)))
                sent = n // 100 * 100
            else:
                for i in range(0, n, 1000):
                    await rc.lpush("raw", *[raw] * min(1000, n - i))
                sent = n
            rate = sent / (time.perf_counter() - t)
            assert await rc.llen("raw") == sent
            return rate
        finally:
            await rc.aclose()

    return case


def runner_case(connect: Connect, n: int, body: dict[str, Any], *, partitioned: bool) -> Case:
    async def case() -> float:
        async with connect() as mq:
            await mq.redis.flushall()
            source: aioredmq.Queue[Any] | aioredmq.PartitionedQueue[Any]
            if partitioned:
                source = mq.partitioned("bench", partitions=PARTITIONS)
                for i in range(0, n, 1000):
                    await asyncio.gather(*(source.publish(body, key=str(k)) for k in range(i, min(i + 1000, n))))
            else:
                source = mq.queue("bench")
                await source.publish_many(body for _ in range(n))
            rate = await runner_rate(mq, source, n, concurrency=CONCURRENCY, prefetch=PREFETCH)
            left = [source] if isinstance(source, aioredmq.Queue) else source.partitions
            for q in left:
                stats = await q.stats()
                assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), stats
            return rate

    return case


def cases(bench: Bench, cluster_url: str, single_url: str, n: int, body: dict[str, Any]) -> None:
    def on_cluster() -> aioredmq.Client:
        return aioredmq.connect(cluster_url, cluster=True)

    def on_single() -> aioredmq.Client:
        return aioredmq.connect(single_url)

    for concurrent, what, raw in (
        (False, "publish_many", "multi-value LPUSH"),
        (True, "100 concurrent publish()", "100 concurrent LPUSH"),
    ):
        baseline = f"raw redis-py cluster: {raw}"
        bench.case(baseline, "publish", raw_publish_case(cluster_url, n, body, concurrent=concurrent))
        for replicas in (0, 1):
            name = f"aioredmq on the cluster: {what}, replicas={replicas}"
            case = publish_case(on_cluster, n, body, concurrent=concurrent, replicas=replicas)
            bench.case(name, "publish", case, baseline=baseline)
    for partitioned, what in ((False, "queue"), (True, f"partitioned queue, {PARTITIONS} partitions")):
        label = f"runner, {what}, concurrency {CONCURRENCY}, prefetch {PREFETCH}"
        single = f"aioredmq on one server: {label}"
        bench.case(single, "e2e", runner_case(on_single, n, body, partitioned=partitioned))
        bench.case(
            f"aioredmq on the cluster: {label}",
            "e2e",
            runner_case(on_cluster, n, body, partitioned=partitioned),
            baseline=single,
        )


async def make(args: argparse.Namespace, cluster_url: str, single_url: str) -> list[CaseResult]:
    bench = Bench("cluster", args)
    cases(bench, cluster_url, single_url, args.messages, body_of(args.body_bytes))
    return await bench.run()


def main() -> None:
    args = options(__doc__, messages=50_000).parse_args()
    if args.redis_url:
        raise SystemExit("bench_cluster starts its own cluster and server; --redis-url is not used")
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    with RedisClusterServers() as cluster, RedisServer() as single:
        t = time.perf_counter()
        results = asyncio.run(make(args, cluster.url, single.url))
        env = environment(single.url, args.loop)
    finish("cluster", args, env, results, time.perf_counter() - t)


if __name__ == "__main__":
    main()
