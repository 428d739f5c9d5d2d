"""Lua scripts: read once from ``aioredmq/lua``, run by EVALSHA, loaded again on NOSCRIPT.

A script's header names its KEYS, ARGV and reply. Every key a script touches is
passed in KEYS and shares the queue's hash tag, so scripts run on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    TimeoutError,
    TryAgainError,
)

from .commands import AnyRedis
from .errors import mapped

__all__ = ("Script", "script")


class Script:
    """One Lua script, identified by the SHA1 of its source."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, redis: AnyRedis, keys: tuple[str | bytes, ...], args: tuple[Any, ...] | list[Any] = ()
    ) -> Any:
        run = redis.execute_command
        with mapped(*keys):
            try:
                return await run("EVALSHA", self.sha, len(keys), *keys, *args)
            except NoScriptError:
                # The server lost its script cache (restart, failover, SCRIPT FLUSH):
                # NOSCRIPT means nothing ran, so loading and running again is safe.
                # script_load: a cluster client sends it to every master, as it must.
                await redis.script_load(self.source)
                return await run("EVALSHA", self.sha, len(keys), *keys, *args)

    async def call_and_wait(
        self,
        redis: AnyRedis,
        keys: tuple[str | bytes, ...],
        args: tuple[Any, ...] | list[Any],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]:
        """Run the script, then ``WAIT replicas timeout_ms`` on the same connection (WAIT
        counts the replicas that have this connection's writes): the reply, and how many
        replicas acknowledged it."""
        evalsha = ("EVALSHA", self.sha, len(keys), *keys, *args)
        with mapped(*keys):
            for attempt in range(2):
                reply, acked = await _on_one_connection(redis, keys[0], [evalsha, ("WAIT", replicas, timeout_ms)])
                if isinstance(reply, NoScriptError) and attempt == 0:
                    await redis.script_load(self.source)  # nothing ran: load it and run again
                    continue
                if isinstance(reply, BaseException):
                    raise reply
                if isinstance(acked, BaseException):
                    raise acked
                return reply, int(acked)
        raise AssertionError("unreachable")  # pragma: no cover


async def _on_one_connection(redis: AnyRedis, key: str | bytes, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one round trip on one connection (on a cluster: one connection
    to the master that owns ``key``); each reply, or the error it was."""
    if isinstance(redis, RedisCluster):
        return await _on_one_node(redis, key, commands)
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        result: list[Any] = await pipe.execute(raise_on_error=False)
        return result


# Replies that mean the slot map is out of date: the master is gone or the slot moved.
_STALE_ROUTE = (ConnectionError, TimeoutError, MovedError, AskError, ClusterDownError, TryAgainError)


async def _on_one_node(redis: RedisCluster, key: str | bytes, commands: list[tuple[Any, ...]]) -> list[Any]:
    # A cluster pipeline sends the commands it holds for one node on one connection.
    # Every command names the node, so a keyless one (WAIT) goes where the key lives.
    # No redirections and no retries inside: WAIT on another connection than the write
    # would count nothing. A reply that says the route is stale refreshes the slot map
    # and is returned as the error it was, so the caller's retry goes to the new owner.
    await redis.initialize()  # a no-op once the slot map is known
    node = redis.get_node_from_key(key if isinstance(key, str) else key.decode())
    assert node is not None  # None only when asked for a replica
    pipe = redis.pipeline()
    for command in commands:
        pipe.execute_command(*command, target_nodes=node)
    result: list[Any] = await pipe.execute(raise_on_error=False, allow_redirections=False)
    if any(isinstance(reply, _STALE_ROUTE) for reply in result):
        await redis.nodes_manager.initialize()
    return result


@cache
def script(name: str) -> Script:
    """The script ``aioredmq/lua/<name>.lua``, read once per process."""
    source = resources.files("aioredmq").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return Script(name, source)
