"""OpenTelemetry tracing (``pip install 'aioredmq[otel]'``), after the messaging
semantic conventions.

    async with aioredmq.connect(url, tracing=OpenTelemetryTracing()) as mq: ...

A publish is a ``send <destination>`` span (kind PRODUCER; one span for a
``publish_many`` batch) whose context travels in each message's headers
(``traceparent``, ``tracestate``). A runner's handler call is a ``process <destination>``
span (kind CONSUMER) linked to the producer's span: the consumer's work is its own
trace, tied to the one that sent the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aioredmq.otel needs opentelemetry-api: pip install 'aioredmq[otel]'") from exc

from .observe import Tracing

if TYPE_CHECKING:
    from .message import Message

__all__ = ("OpenTelemetryTracing",)


class OpenTelemetryTracing(Tracing):
    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from . import __version__

        self._tracer = trace.get_tracer("aioredmq", __version__, tracer_provider=tracer_provider)

    def publish(
        self, destination: str, headers: Mapping[str, str] | None, count: int
    ) -> tuple[Mapping[str, str] | None, AbstractContextManager[Any]]:
        attributes: dict[str, Any] = {
            "messaging.system": "redis",
            "messaging.destination.name": destination,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        span = self._tracer.start_span(f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes)
        carrier = dict(headers or {})
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier, trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True)

    def process(self, source: str, message: Message[Any]) -> AbstractContextManager[Any]:
        destination, _, group = source.partition("/")
        attributes: dict[str, Any] = {
            "messaging.system": "redis",
            "messaging.destination.name": destination,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": message.id,
            "aioredmq.deliveries": message.deliveries,
        }
        if group:
            attributes["messaging.consumer.group.name"] = group
        sent = trace.get_current_span(propagate.extract(dict(message.headers))).get_span_context()
        links = [Link(sent)] if sent.is_valid else []
        return self._tracer.start_as_current_span(
            f"process {destination}", kind=SpanKind.CONSUMER, links=links, attributes=attributes
        )
