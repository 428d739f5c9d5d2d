"""Lua scripts: read once from ``aioredmq/lua``, run by EVALSHA, loaded again on NOSCRIPT.

A script's header names its KEYS, ARGV and reply. Every key a script touches is
passed in KEYS and shares the queue's hash tag, so scripts run on Redis Cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from .commands import AnyRedis
from .errors import mapped

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

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
                reply, acked = await _on_one_connection(
                    redis, keys[0], [evalsha, ("WAIT", replicas, timeout_ms)], timeout_ms / 1000
                )
                if isinstance(reply, NoScriptError) and attempt == 0:
                    await redis.script_load(self.source)  # nothing ran: load it and run again
                    continue
                if isinstance(reply, BaseException):
                    raise reply
                if isinstance(acked, BaseException):
                    raise acked
                return reply, int(acked)
        raise AssertionError("unreachable")  # pragma: no cover


# Replies that mean the slot map is out of date: the master is gone or the slot moved.
_STALE_ROUTE = (ConnectionError, TimeoutError, AskError, ClusterDownError, TryAgainError)


async def _on_one_connection(
    redis: AnyRedis, key: str | bytes, commands: list[tuple[Any, ...]], patience_s: float
) -> list[Any]:
    """Send ``commands`` in one round trip on one connection (on a cluster, one to the
    master that owns ``key``) and read each reply, or the error reply it was. A reply may
    take ``patience_s`` longer than the socket timeout (a WAIT blocks that long).

    redis-py's pipelines read with the socket timeout alone, and a cluster pipeline may
    resend a command on another connection: either would break WAIT, so this sends by
    hand. A lost connection raises; on a cluster it first refreshes the slot map, so the
    caller's retry goes to the new owner."""
    if not isinstance(redis, RedisCluster):
        pool = redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await _exchange(conn, commands, patience_s)
        finally:
            await pool.release(conn)
    await redis.initialize()  # a no-op once the slot map is known
    node = redis.get_node_from_key(key if isinstance(key, str) else key.decode())
    assert node is not None  # None only when asked for a replica
    try:
        node_conn = node.acquire_connection()
        try:
            replies = await _exchange(node_conn, commands, patience_s)
        finally:
            node.release(node_conn)
        if any(isinstance(reply, _STALE_ROUTE) for reply in replies):
            await _refresh(redis)
    except _STALE_ROUTE:
        await _refresh(redis)
        raise
    return replies


async def _refresh(redis: RedisCluster) -> None:
    """Ask the cluster for its slot map again. If no node answers, the caller's next try
    asks again (through ``initialize``); the error it reports is the one that happened."""
    with contextlib.suppress(RedisError, RedisClusterException, OSError):
        await redis.nodes_manager.initialize()


async def _exchange(conn: AbstractConnection, commands: list[tuple[Any, ...]], patience_s: float) -> list[Any]:
    # redis-py drops the connection itself when a send or read fails or is cancelled.
    # A read given its own timeout is the exception: when it runs out, it returns None
    # and keeps the connection, whose late replies would then answer the next command.
    timeout = None if conn.socket_timeout is None else conn.socket_timeout + patience_s
    await conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            reply = await conn.read_response(timeout=timeout)
        except ResponseError as exc:  # an error reply: the connection is fine, read on
            replies.append(exc)
            continue
        if reply is None:  # no script or WAIT of ours replies nil: the read timed out
            await conn.disconnect(nowait=True)
            raise TimeoutError(f"Redis did not reply within {timeout} s")
        replies.append(reply)
    return replies


@cache
def script(name: str) -> Script:
    """The script ``aioredmq/lua/<name>.lua``, read once per process."""
    source = resources.files("aioredmq").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return Script(name, source)
