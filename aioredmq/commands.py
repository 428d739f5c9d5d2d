"""The one typed doorway to redis-py: raw commands with errors mapped to aioredmq's."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from .errors import mapped

__all__ = ("AnyRedis", "execute", "pipeline")

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
