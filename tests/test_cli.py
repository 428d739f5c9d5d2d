"""The command line, run as a subprocess against a real redis-server: stats, peek, dead, bench."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioredmq

from .conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.timeout(90)


async def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = await anyio.run_process([PYTHON, "-m", "aioredmq", *args], env=subprocess_env(), cwd=ROOT, check=False)
    out = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
    if check and out.returncode:
        raise AssertionError(f"aioredmq {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


async def cli_json(*args: str) -> Any:
    return json.loads((await cli(*args, "--json")).stdout)


async def test_stats_shows_queues_streams_consumers_and_groups(mq: aioredmq.Client, redis_url: str) -> None:
    orders = mq.queue("orders")
    await orders.publish_many([{"n": i} for i in range(7)])
    await orders.publish({"n": 99}, delay=60)
    events = mq.stream("events")
    await events.create_group("billing", "begin")
    await events.publish_many([{"e": i} for i in range(4)])
    async with orders.consume(prefetch=2, name="worker-1", block_s=0.2) as consumer:
        await anyio.sleep(0.2)  # it fetched its two and renewed its lease
        data = await cli_json("stats", "--url", redis_url)
        table = (await cli("stats", "--url", redis_url)).stdout
        assert consumer.held == 2
    q = data["queues"]["orders"]
    assert (q["ready"], q["in_flight"], q["delayed"], q["dead"]) == (5, 2, 1, 0)
    assert 0 <= q["consumers"]["worker-1"]["last_heartbeat_s_ago"] < 5
    g = data["streams"]["events"]["groups"]["billing"]
    assert (data["streams"]["events"]["length"], g["pending"], g["lag"]) == (4, 0, 4)
    assert "orders" in table
    assert "worker-1" in table
    assert "billing" in table
    # Named: only that one.
    only = await cli_json("stats", "events", "--url", redis_url)
    assert list(only["streams"]) == ["events"]
    assert only["queues"] == {}


async def test_peek_shows_the_next_messages_without_taking_them(mq: aioredmq.Client, redis_url: str) -> None:
    q = mq.queue("peeked")
    ids = await q.publish_many([{"n": i} for i in range(5)])
    rows = await cli_json("peek", "peeked", "--count", "3", "--url", redis_url)
    assert [r["id"] for r in rows] == ids[:3]
    assert json.loads(rows[0]["body"]) == {"n": 0}
    assert (await q.stats()).ready == 5, "peek took nothing"
    s = mq.stream("peeked-s")
    await s.create_group("g", "begin")
    sids = await s.publish_many([{"n": i} for i in range(3)])
    async with s.consume("g", prefetch=1, block_s=0.2) as consumer:
        msg = await consumer.__anext__()  # it holds its prefetch of one: it reads no more
        rows = await cli_json("peek", "peeked-s", "--group", "g", "--url", redis_url)
        await msg.ack()
    assert [r["id"] for r in rows] == sids[1:], "what the group has not been given yet"


async def test_dead_letters_are_listed_filtered_requeued_and_purged(
    mq: aioredmq.Client, raw: aioredis.Redis, redis_url: str
) -> None:
    q = mq.queue("dl", retry=aioredmq.RetryPolicy(max_deliveries=1))
    ids = await q.publish_many([{"n": i} for i in range(4)])
    await raw.lpush(q.keys.ready, b"not an envelope")
    async with q.consume(block_s=0.2) as consumer:
        for _ in range(4):
            msg = await consumer.__anext__()
            reason = "timeout talking to billing" if msg.body["n"] % 2 else "bad address"
            await msg.dead_letter(reason)
        await anyio.sleep(0.3)  # the undecodable one is dead-lettered on fetch
    assert (await q.stats()).dead == 5
    listed = await cli_json("dead", "list", "dl", "--url", redis_url)
    assert len(listed) == 5
    timeouts = await cli_json("dead", "list", "dl", "--reason", "TIMEOUT", "--url", redis_url)
    assert sorted(r["id"] for r in timeouts) == sorted(ids[1::2])
    # Changing commands need a filter or --all.
    refused = await cli("dead", "purge", "dl", "--url", redis_url, check=False)
    assert refused.returncode != 0
    assert "--all" in refused.stderr
    assert await cli_json("dead", "requeue", "dl", "--id", ids[0], "--url", redis_url) == {"requeued": 1}
    assert await cli_json("dead", "purge", "dl", "--reason", "timeout", "--url", redis_url) == {"purged": 2}
    stats = await q.stats()
    assert (stats.ready, stats.dead) == (1, 2), "one requeued, two purged, the rest stay"
    assert await cli_json("dead", "purge", "dl", "--all", "--url", redis_url) == {"purged": 2}


async def test_bench_compares_with_raw_redis_py_in_the_same_run(redis_url: str) -> None:
    data = await cli_json("bench", "--messages", "2000", "--rounds", "1", "--url", redis_url)
    assert set(data["median_msg_per_s"]) == {"raw publish", "raw consume", "publish", "consume"}
    assert all(v > 0 for v in data["median_msg_per_s"].values())
    assert data["vs_raw"]["end_to_end"] > 0


async def test_a_group_where_none_applies_or_none_where_one_must_is_a_clear_error(
    mq: aioredmq.Client, redis_url: str
) -> None:
    await mq.queue("plain").publish(1)
    await mq.stream("grouped").publish(1)
    for args, why in (
        (("dead", "list", "plain", "--group", "g"), "is a queue: it has no groups"),
        (("dead", "list", "grouped"), "is a stream: say which group"),
        (("peek", "grouped", "--group", "nope"), "has no group 'nope'"),
    ):
        done = await cli(*args, "--url", redis_url, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert why in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
