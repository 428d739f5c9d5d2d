"""Consume-side idempotency: apply a handler's effect once per message id.

Delivery is at least once: after a crash or a lost lease a message comes again, with
the same id. This helper keeps processed-id markers, one sorted set per queue (per
group, for streams) scored by expiry, and offers two levels:

* :meth:`Idempotency.process`: skips a message whose id is marked, and on success acks
  *and* writes the marker in the same script call. A redelivery after the ack (a late
  duplicate, a lease lost after the work was done) is suppressed. A crash between the
  effect and the ack is not covered by this alone: the effect ran, the marker did not.
* :meth:`Idempotency.apply`: writes Redis effects and the marker in one script call,
  only if the marker is absent. The effect then happens once, even if the process dies
  before its ack or two consumers hold the message at once.

For an effect in another store (a SQL database, say), write the effect and the message
id in the same transaction there, with the id as a unique key, and skip the effect when
the insert conflicts: the marker must commit with the effect, or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from .commands import pipeline
from .config import check_positive
from .errors import AioredmqError, ConfigError
from .message import Message
from .scripts import script

__all__ = ("MAX_COMMAND_ARGS", "Idempotency")

MAX_COMMAND_ARGS = 7900
"""The most arguments after its key that one command of :meth:`Idempotency.apply` may have."""

log = logging.getLogger("aioredmq.idempotency")
T = TypeVar("T")

Command = Sequence[Any]
"""``(name, key, *args)``: a Redis command on one key, e.g. ``("INCRBY", "stock:{orders}:7", -1)``."""


class Idempotency:
    """Processed-id markers kept for ``ttl_s`` (longer than any redelivery can come)."""

    def __init__(self, ttl_s: float = 7 * 24 * 3600) -> None:
        check_positive("ttl_s", ttl_s)
        self.ttl_s = float(ttl_s)
        self._ttl_ms = max(1, int(ttl_s * 1000))

    def __repr__(self) -> str:
        return f"Idempotency(ttl_s={self.ttl_s})"

    async def seen(self, msg: Message[Any]) -> bool:
        """Whether ``msg``'s id is marked processed (for its queue, or its group)."""
        consumer = msg._consumer
        key = consumer._done_key
        expiry, (now_s, now_us) = await pipeline(
            consumer.client.redis, [("ZSCORE", key, msg.id), ("TIME",)], keys=(key,)
        )
        return expiry is not None and float(expiry) > int(now_s) * 1000 + int(now_us) // 1000

    def process(self, msg: Message[T]) -> _Once[T]:
        """``async with once.process(msg) as fresh:``: ``fresh`` is False when the id is
        marked (the block should skip the work; the message is acked on exit). On success
        the ack and the marker are written together; on an exception the message is
        nacked as by :meth:`Message.process`, and no marker is written."""
        return _Once(self, msg)

    async def apply(self, msg: Message[Any], *commands: Command) -> bool:
        """Run ``commands`` and mark ``msg`` processed, atomically, unless it is marked.

        Returns True if they ran now, False if the id was already marked (they ran before).
        Each command is ``(name, key, *args)`` on one key. On Redis Cluster the keys must
        hash to the queue's slot: put the queue's ``{name}`` hash tag in them. Redis does
        not roll a script back: a command that fails leaves those before it applied and
        writes no marker, so keep the commands ones that cannot fail (right key types).
        A command with more than ``MAX_COMMAND_ARGS`` (7,900) arguments after its key
        raises ``ConfigError`` before anything is sent.
        """
        consumer = msg._consumer
        keys: list[str] = [consumer._done_key]
        args: list[Any] = [msg.id, self._ttl_ms]
        for command in commands:
            if len(command) < 2 or not isinstance(command[0], str) or not isinstance(command[1], str):
                raise TypeError(f"a command is (name, key, *args) with str name and key, not {command!r}")
            name, key, *rest = command
            if len(rest) > MAX_COMMAND_ARGS:
                # Lua passes at most about 8,000 values to one call: the script would fail
                # there, after the commands before it ran. Refuse before anything runs.
                raise ConfigError(
                    f"a {name} command of apply() has {len(rest)} arguments after its key; at most "
                    f"{MAX_COMMAND_ARGS} fit in one call: split it into several commands"
                )
            keys.append(key)
            args += (len(rest), name, *rest)
        applied = await script("apply_once")(consumer.client.redis, tuple(keys), args)
        return bool(applied)


class _Once(Generic[T]):
    __slots__ = ("_fresh", "_msg", "_once", "_processing")

    def __init__(self, once: Idempotency, msg: Message[T]) -> None:
        self._once = once
        self._msg = msg
        self._processing = msg.process()
        self._fresh = True

    async def __aenter__(self) -> bool:
        await self._processing.__aenter__()
        msg = self._msg
        try:
            self._fresh = not await self._once.seen(msg)
        except AioredmqError as exc:
            log.warning("message %s: processed-id check failed (%s); retrying it later", msg.id, exc)
            msg._claim("nack")
            msg._consumer._settle_nack(msg, None, f"processed-id check failed: {exc}")
            self._fresh = False
            return False
        if not self._fresh:
            log.info("message %s was processed before; skipping it", self._msg.id, extra={"message_id": self._msg.id})
        return self._fresh

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        msg = self._msg
        if exc is None and self._fresh and not msg._settled:
            msg._claim("ack")
            msg._consumer._settle_ack_marked(msg, self._once._ttl_ms)
        return await self._processing.__aexit__(exc_type, exc, tb)
