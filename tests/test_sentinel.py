"""Sentinel: connect through the master the sentinels report; after the master is killed,
work resumes on the promoted replica. Marked ``sentinel``."""

from __future__ import annotations

import signal

import pytest

import aioredmq
from aioredmq.testing import RedisSentinelServers

from .failover import run_through
from .ledger import report

pytestmark = [pytest.mark.sentinel, pytest.mark.fault, pytest.mark.timeout(90)]


async def test_work_resumes_on_the_promoted_replica_after_the_master_is_killed() -> None:
    with RedisSentinelServers("orders-master", down_after_ms=1000) as servers:
        async with aioredmq.connect(aioredmq.Sentinels("orders-master", servers.sentinels), socket_timeout_s=1.0) as mq:
            run = await run_through(
                mq,
                mq.queue("s-orders", lease_s=2.0),
                lambda: servers.master.kill(signal.SIGKILL),
                replicas=lambda n: 1 if n < 100 else 0,
            )
    durable_lost = sorted(n for n in run.lost if n < 100)
    report(
        "sentinel: the master SIGKILLed mid-run",
        len(run.confirmed),
        lost=len(run.lost),
        recovery_s=run.resumed_s,
        faults=f"master SIGKILL, replica promoted (down-after 1 s); {len(durable_lost)} lost of the first 100, "
        "sent with replicas=1",
    )
    assert not durable_lost, f"publishes a replica acknowledged were lost: {durable_lost}"
    assert run.resumed_s < 3.0, f"work resumed only after {run.resumed_s:.1f} s"
