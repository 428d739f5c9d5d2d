"""The one typed doorway to redis-py: raw commands with errors mapped to aioredmq's."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from .errors import ConnectionLostError, mapped

__all__ = ("AnyRedis", "execute", "pipeline", "resent_once")

P = ParamSpec("P")
R = TypeVar("R")

AnyRedis = Redis | RedisCluster
"""A client of one Redis (or of its Sentinel-managed master), or of a Redis Cluster."""


async def execute(redis: AnyRedis, *args: Any, keys: tuple[str, ...] = ()) -> Any:
    """Run one command; ``keys`` name what it touches, for error messages."""
    with mapped(*keys):
        return await redis.execute_command(*args)


async def pipeline(
    redis: AnyRedis, commands: list[tuple[Any, ...]], *, keys: tuple[str, ...] = (), transaction: bool = False
) -> list[Any]:
    """Run commands in one round trip (MULTI/EXEC if ``transaction``); return the replies in order."""
    if not commands:
        return []
    with mapped(*keys):
        async with redis.pipeline(transaction=transaction) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute()
            return replies


def resent_once(call: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """For calls that are safe to send twice (reads, and writes such as ZREM that do
    nothing the second time): after a lost connection, send once more. The pool hands out
    connections that Redis may have closed while they sat idle (its ``timeout``, a proxy,
    a restart); the first command on one fails, the next gets a fresh connection."""

    @functools.wraps(call)
    async def once_more(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except ConnectionLostError:
            return await call(*args, **kwargs)

    return once_more
