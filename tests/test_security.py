"""Security: TLS (rediss://) against a TLS redis-server, and a least-privilege ACL user.

Certificates are made in the test (trustme: a throwaway CA and a server certificate for
127.0.0.1). The ACL user gets exactly the commands and key patterns the README lists,
and every feature is run with only those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import trustme

import aioredmq
from aioredmq.testing import RedisServer, free_port

from .helpers import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]


async def exercise(mq: aioredmq.Client, tag: str) -> None:
    """Every feature once: a queue (publish, consume, ack, nack to dead-letter, delayed,
    stats, dead letters), a stream group, and a pub/sub channel."""
    queue = mq.queue(f"{tag}-q", retry=aioredmq.RetryPolicy(max_deliveries=1))
    await queue.publish_many([{"n": i} for i in range(20)])
    await queue.publish({"n": 20}, delay=0.2)
    seen: list[int] = []

    async def handler(msg: aioredmq.Message[Any]) -> None:
        if msg.body["n"] == 0:
            raise ValueError("to dead-letter")
        seen.append(msg.body["n"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: mq.run(queue, handler, concurrency=4))
        await wait_for(lambda: len(seen) == 20, 10, "the queue's messages, the delayed one too")
        tg.cancel_scope.cancel()
    stats = await queue.stats()
    assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 1), stats
    (record,) = await queue.dead_letters()
    assert "to dead-letter" in record.reason

    stream = mq.stream(f"{tag}-s")
    await stream.create_group("g", "begin")
    ids = await stream.publish_many([{"n": i} for i in range(10)])
    got: list[str] = []
    async with stream.consume("g", block_s=0.2) as consumer:
        async for msg in consumer:
            got.append(msg.id)
            await msg.ack()
            if len(got) == len(ids):
                break
    assert got == ids
    assert (await stream.stats()).groups["g"].pending == 0

    channel = mq.channel(f"{tag}-c")
    async with channel.subscribe() as sub:
        await channel.publish({"hello": tag})
        with anyio.fail_after(5):
            broadcast = await sub.__anext__()
    assert broadcast.body == {"hello": tag}


async def test_everything_works_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, chain_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(chain_file), append=i > 0)
    tls_port = free_port()
    server = RedisServer(
        "--tls-port", str(tls_port), "--tls-cert-file", str(chain_file), "--tls-key-file", str(key_file),
        "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no",
    )  # fmt: skip
    with server:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}"
        async with aioredmq.connect(url) as mq:
            await exercise(mq, "tls")
        # Without the CA the server's certificate is not trusted: no silent fallback.
        async with aioredmq.connect(f"rediss://127.0.0.1:{tls_port}/0") as untrusted:
            with pytest.raises(aioredmq.AioredmqError):
                await untrusted.queue("tls-q").publish(1)


ACL_COMMANDS = [
    "+ping",
    "+hello",
    "+evalsha",
    "+script|load",
    "+multi",
    "+exec",
    "+blmove",
    "+xreadgroup",
    "+publish",
    "+subscribe",
    "+unsubscribe",
    "+psubscribe",
    "+punsubscribe",
    "+get",
    "+set",
    "+exists",
    "+del",
    "+incrby",
    "+time",
    "+info",
    "+type",
    "+llen",
    "+lrange",
    "+lpush",
    "+rpush",
    "+rpop",
    "+lrem",
    "+ltrim",
    "+zadd",
    "+zrem",
    "+zcard",
    "+zrange",
    "+zrangebyscore",
    "+zremrangebyscore",
    "+zscore",
    "+hset",
    "+hget",
    "+hdel",
    "+hgetall",
    "+xadd",
    "+xlen",
    "+xrange",
    "+xack",
    "+xclaim",
    "+xautoclaim",
    "+xpending",
    "+xtrim",
    "+xgroup|create",
    "+xgroup|delconsumer",
    "+xinfo|groups",
    "+xinfo|consumers",
]
"""What the README's ACL line grants (Redis 7.2 and later: also +client|setinfo)."""


async def acl_user(raw: aioredis.Redis, user: str, prefix: str) -> None:
    """A user with only ACL_COMMANDS, on ``prefix``'s keys and channels."""
    await raw.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", user, "reset", "on", ">secret", f"~{prefix}:*", f"&{prefix}:*", f"&{prefix}:{{*}}:due",
        *ACL_COMMANDS,
    )  # fmt: skip


async def test_a_least_privilege_acl_user_can_do_everything_and_no_more(
    raw: aioredis.Redis, redis_server: RedisServer
) -> None:
    await acl_user(raw, "tenant-a", "tenant-a")
    url = f"redis://tenant-a:secret@127.0.0.1:{redis_server.port}/0"
    async with aioredmq.connect(url, prefix="tenant-a") as mq:
        await exercise(mq, "acl")
        # Nothing beyond the list: no other command, no other tenant's keys.
        with pytest.raises(aioredis.ResponseError, match="no permissions"):
            await mq.redis.flushall()
    denied = await raw.execute_command("ACL", "LOG", "100")  # type: ignore[no-untyped-call]
    assert not denied or all(_field(e, "object") == b"flushall" for e in denied), denied
    async with aioredmq.connect(url, prefix="tenant-b") as other:
        with pytest.raises(aioredmq.AioredmqError, match="permission"):
            await other.queue("jobs").publish(1)
    assert [k async for k in raw.scan_iter(match="tenant-b:*")] == []


def _field(entry: Any, name: str) -> Any:
    if isinstance(entry, dict):
        return entry.get(name, entry.get(name.encode()))
    fields = dict(zip(entry[::2], entry[1::2], strict=False))
    return fields.get(name.encode(), fields.get(name))
