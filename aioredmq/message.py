"""A delivered message and what its holder may do with it: ack, nack, dead-letter."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from .config import check_positive
from .envelope import Envelope
from .errors import MessageStateError

if TYPE_CHECKING:
    from .base_consumer import BaseConsumer

__all__ = ("Message",)

log = logging.getLogger("aioredmq.message")
T = TypeVar("T")


class Message(Generic[T]):
    """One delivery of a message.

    ``id`` is unique and time-ordered, and the same on every redelivery: use it to
    deduplicate. ``deliveries`` counts this delivery too (1 on the first).
    """

    __slots__ = (
        "_consumer",
        "_ref",
        "_settled",
        "_started",
        "body",
        "deliveries",
        "headers",
        "id",
        "published_at",
        "raw",
    )

    def __init__(
        self, consumer: BaseConsumer[T], ref: bytes, raw: bytes, env: Envelope, body: T, deliveries: int
    ) -> None:
        self.id: str = env.id
        self.body: T = body
        self.headers: Mapping[str, str] = env.headers
        self.deliveries: int = deliveries
        self.published_at: float = env.published_ms / 1000.0
        self.raw = raw
        self._ref = ref  # what names this delivery in Redis: the envelope, or a stream entry id
        self._consumer = consumer
        self._settled = False
        self._started = False

    def __repr__(self) -> str:
        return f"<Message id={self.id} deliveries={self.deliveries}>"

    @property
    def settled(self) -> bool:
        """True once acked, nacked or dead-lettered."""
        return self._settled

    def _claim(self, action: str) -> None:
        if self._settled:
            raise MessageStateError(f"cannot {action} message {self.id}: it was already settled")
        self._settled = True

    async def ack(self) -> None:
        """Acknowledge: the message is done and leaves the queue.

        Acks are batched: this returns once the ack is queued for the next flush, which
        starts at once when idle. Closing the consumer flushes every pending ack.
        """
        if self._settled:
            self._claim("ack")  # raises
        self._settled = True
        self._consumer._settle_ack(self)

    async def nack(self, *, delay_s: float | None = None, reason: str = "nacked") -> None:
        """Give the message back for another try, or to dead-letter once it has had
        ``max_deliveries`` deliveries. ``delay_s`` overrides the backoff policy (0: now)."""
        if delay_s is not None:
            check_positive("delay_s", delay_s, zero=True)
        self._claim("nack")
        self._consumer._settle_nack(self, delay_s, reason)

    async def dead_letter(self, reason: str) -> None:
        """Move the message to dead-letter at once, with ``reason``."""
        self._claim("dead-letter")
        self._consumer._settle_dead(self, reason)

    def process(self) -> _Processing[T]:
        """Ack when the block succeeds; nack (retry or dead-letter) when it raises.

        An exception from the block is logged with the message id and not re-raised:
        the message's fate records it, and one bad message must not end a consume loop.
        Cancellation gives the message back to the front of the queue and propagates.
        Settling only queues the settle (the consumer's flusher sends it), so nothing here
        awaits I/O and a cancellation cannot cut a settle in half.
        """
        return _Processing(self)


class _Processing(Generic[T]):
    """``async with msg.process()``: a class, not a generator, since it runs per message."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Message[T]) -> None:
        self._msg = msg

    async def __aenter__(self) -> Message[T]:
        return self._msg

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return settle_outcome(self._msg, exc)


def settle_outcome(msg: Message[T], exc: BaseException | None) -> bool:
    """Settle ``msg`` by how its handling ended (see :meth:`Message.process`); return
    whether ``exc`` is dealt with (True) or must propagate (cancellation)."""
    if exc is None:
        if not msg._settled:
            msg._settled = True
            msg._consumer._settle_ack(msg)
        return False
    if isinstance(exc, Exception):
        log.warning(
            "handler failed for message %s (delivery %d): %r",
            msg.id,
            msg.deliveries,
            exc,
            exc_info=exc,
            extra={"queue": msg._consumer.label, "message_id": msg.id, "deliveries": msg.deliveries},
        )
        if not msg._settled:
            msg._claim("nack")
            text = str(exc)  # `raise ValueError()` has none: then the type alone is the reason
            reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            msg._consumer._settle_nack(msg, None, reason)
        return True  # handled: the message's fate records it
    if not msg._settled:  # cancellation or another BaseException: give it back
        msg._claim("give back")
        msg._consumer._settle_release(msg)
    return False
