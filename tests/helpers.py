"""Small shared helpers for the tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio

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
