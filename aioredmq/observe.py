"""What the library reports while it works, for metrics and tracing.

``connect(url, metrics=..., tracing=...)`` takes a :class:`Metrics` (such as
:class:`aioredmq.prometheus.PrometheusMetrics`) and a :class:`Tracing` (such as
:class:`aioredmq.otel.OpenTelemetryTracing`). Without them the library calls nothing:
each call site checks for ``None`` first, so the hot path pays one attribute test.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .message import Message

__all__ = ("Metrics", "Tracing")


class Metrics:
    """Counters and timings, by source: a queue's name, or ``"<stream>/<group>"`` for a
    stream group's consumers. Override what you record; every method does nothing here."""

    def published(self, source: str, count: int) -> None:
        """``count`` messages confirmed by Redis."""

    def delivered(self, source: str, deliveries: int) -> None:
        """A message handed out; ``deliveries`` > 1 is a redelivery."""

    def acked(self, source: str) -> None: ...

    def nacked(self, source: str) -> None:
        """Given back for another try (a retry, not dead-letter)."""

    def dead_lettered(self, source: str) -> None: ...

    def late_acks(self, source: str, count: int) -> None:
        """Settles that arrived after the lease was lost (the message was recovered elsewhere)."""

    def handled(self, source: str, seconds: float, ok: bool) -> None:
        """A runner's handler ran for ``seconds`` and returned (``ok``) or raised."""


class Tracing:
    """Spans around publishing and handling. Override both; these do nothing."""

    def publish(
        self, destination: str, headers: Mapping[str, str] | None, count: int
    ) -> tuple[Mapping[str, str] | None, AbstractContextManager[Any]]:
        """The headers to send (with the trace context in them) and a context manager that
        spans the send: it sees the exception if the publish fails."""
        return headers, _NOTHING

    def process(self, source: str, message: Message[Any]) -> AbstractContextManager[Any]:
        """A context manager around a runner's handler call, linked to the producer's span."""
        return _NOTHING


class _Nothing(AbstractContextManager[None]):
    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _Nothing()
