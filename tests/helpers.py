"""Small shared helpers for the tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import redis.asyncio as aioredis

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


def mq_url(mq: aioredmq.Client) -> str:
    """The URL the client is connected to, for a child process."""
    kw = mq.redis.connection_pool.connection_kwargs
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
