"""Small shared helpers for the tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

import aioredmq


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state outside this process too
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def settled_stats(queue: aioredmq.Queue[object], **expected: int) -> aioredmq.QueueStats:
    """Wait until the queue's counts equal ``expected`` (e.g. ready=0, dead=1) and return them."""
    stats = await queue.stats()
    with anyio.move_on_after(10):
        while any(getattr(stats, k) != v for k, v in expected.items()):
            await anyio.sleep(0.02)
            stats = await queue.stats()
    assert all(getattr(stats, k) == v for k, v in expected.items()), (stats, expected)
    return stats


def single(redis: aioredis.Redis | RedisCluster) -> aioredis.Redis:
    """A client of one Redis, as every test but the cluster ones uses."""
    assert isinstance(redis, aioredis.Redis), f"expected a single-server client, got {redis!r}"
    return redis


def mq_url(mq: aioredmq.Client) -> str:
    """The URL the client is connected to, for a child process."""
    kw = single(mq.redis).connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


# redis-py types its replies as ``bytes | str`` since it cannot know about ``decode_responses``.
# Every client in these tests is made without it, so replies are bytes: these helpers check that
# and hand back precisely typed values.


def as_bytes(reply: bytes | str) -> bytes:
    """A reply from a client made without ``decode_responses``: always bytes."""
    assert isinstance(reply, bytes), f"expected bytes (decode_responses is off), got {reply!r}"
    return reply


async def lrange_bytes(raw: aioredis.Redis, key: str, start: int = 0, end: int = -1) -> list[bytes]:
    """``LRANGE key start end`` as bytes."""
    return [as_bytes(item) for item in await raw.lrange(key, start, end)]


async def lindex_bytes(raw: aioredis.Redis, key: str, index: int) -> bytes | None:
    """``LINDEX key index`` as bytes, or ``None`` when there is no such element."""
    item = await raw.lindex(key, index)
    return None if item is None else as_bytes(item)


async def zrange_with_scores(raw: aioredis.Redis, key: str, start: int = 0, end: int = -1) -> list[tuple[bytes, float]]:
    """``ZRANGE key start end WITHSCORES`` as ``(member, score)`` pairs."""
    pairs: list[tuple[bytes, float]] = []
    for pair in await raw.zrange(key, start, end, withscores=True):
        assert isinstance(pair, tuple | list), f"expected a (member, score) pair, got {pair!r}"
        assert len(pair) == 2, f"expected a (member, score) pair, got {pair!r}"
        member, score = pair
        assert isinstance(score, float), f"expected a float score, got {score!r}"
        pairs.append((as_bytes(member), score))
    return pairs


async def stream_entries(raw: aioredis.Redis, key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """``XRANGE key - +`` as ``(entry id, fields)`` pairs."""
    rows = await raw.execute_command("XRANGE", key, "-", "+")  # type: ignore[no-untyped-call]
    out: list[tuple[str, dict[bytes, bytes]]] = []
    for entry_id, fields in rows:
        assert isinstance(fields, dict), f"expected the entry's fields, got {fields!r}"
        out.append((as_bytes(entry_id).decode(), {as_bytes(k): as_bytes(v) for k, v in fields.items()}))
    return out


async def stream_pending(raw: aioredis.Redis, key: str, group: str) -> dict[str, tuple[str, int]]:
    """A group's pending entries: entry id -> (consumer, delivery count)."""
    out: dict[str, tuple[str, int]] = {}
    for row in await raw.xpending_range(key, group, "-", "+", 100_000):
        entry_id, consumer, count = row["message_id"], row["consumer"], row["times_delivered"]
        assert isinstance(entry_id, bytes), row
        assert isinstance(consumer, bytes), row
        assert isinstance(count, int), row
        out[entry_id.decode()] = (consumer.decode(), count)
    return out
