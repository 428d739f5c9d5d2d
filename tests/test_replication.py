"""Opt-in replicated durability: a publish that waits for N replicas (WAIT), against a
real master and replica."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

import aioredmq
from aioredmq.testing import RedisServer

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
