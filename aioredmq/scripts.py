"""Lua scripts: read once from ``aioredmq/lua``, run by EVALSHA, loaded again on NOSCRIPT.

A script's header names its KEYS, ARGV and reply. Every key a script touches is
passed in KEYS and shares the queue's hash tag, so scripts run on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

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


@cache
def script(name: str) -> Script:
    """The script ``aioredmq/lua/<name>.lua``, read once per process."""
    source = resources.files("aioredmq").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return Script(name, source)
