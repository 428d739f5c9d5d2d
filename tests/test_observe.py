"""Observability: Prometheus metrics scraped over HTTP after real traffic, OpenTelemetry
spans in an in-memory exporter, and the structured context of the library's log records."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import aioredmq
from aioredmq.otel import OpenTelemetryTracing
from aioredmq.prometheus import PrometheusMetrics
from aioredmq.testing import free_port

from .helpers import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, as Prometheus would: sample (name, labels) -> value."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def metrics_server(registry: CollectorRegistry) -> Iterator[int]:
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_metrics_count_what_happened_and_gauges_show_depth_and_lag(
    redis_url: str, registry: CollectorRegistry, metrics_server: int
) -> None:
    metrics = PrometheusMetrics(registry=registry)
    async with aioredmq.connect(redis_url, metrics=metrics) as mq:
        q = mq.queue("metered", retry=aioredmq.RetryPolicy(max_deliveries=2, backoff_initial_s=0.01))
        await q.publish_many([{"n": i} for i in range(9)])
        await q.publish({"n": "poison"})
        done: list[Any] = []

        async def handler(msg: aioredmq.Message[Any]) -> None:
            if msg.body["n"] == "poison":
                raise ValueError("poison")
            done.append(msg.body["n"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: mq.run(q, handler, concurrency=2))
            await wait_for(lambda: len(done) == 9, 10, "the good ones")
            with anyio.fail_after(10):
                while (await q.stats()).dead != 1:  # noqa: ASYNC110 - polling Redis
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        s = mq.stream("metered-s")
        await s.create_group("g", "begin")
        await s.publish_many([{"n": i} for i in range(5)])
        await metrics.refresh(q, s)
        before = await scrape(metrics_server)
        async with s.consume("g", block_s=0.2) as consumer:
            for _ in range(5):
                await (await consumer.__anext__()).ack()
        await metrics.refresh(s)
        after = await scrape(metrics_server)

    def value(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    src = {"source": "metered"}
    assert value(before, "aioredmq_published_total", **src) == 10
    assert value(before, "aioredmq_delivered_total", **src) == 11, "the poison twice"
    assert value(before, "aioredmq_redelivered_total", **src) == 1
    assert value(before, "aioredmq_acked_total", **src) == 9
    assert value(before, "aioredmq_nacked_total", **src) == 1
    assert value(before, "aioredmq_dead_lettered_total", **src) == 1
    assert value(before, "aioredmq_handler_duration_seconds_count", source="metered", outcome="ok") == 9
    assert value(before, "aioredmq_handler_duration_seconds_count", source="metered", outcome="error") == 2
    assert value(before, "aioredmq_messages", source="metered", state="ready") == 0
    assert value(before, "aioredmq_messages", source="metered", state="dead") == 1
    assert value(before, "aioredmq_group_lag", source="metered-s", group="g") == 5
    assert value(after, "aioredmq_group_lag", source="metered-s", group="g") == 0
    assert value(after, "aioredmq_group_pending", source="metered-s", group="g") == 0
    assert value(after, "aioredmq_acked_total", source="metered-s/g") == 5
    assert value(after, "aioredmq_published_total", source="metered-s") == 5


async def test_a_consumer_span_links_to_the_producer_span_through_the_headers(redis_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with aioredmq.connect(redis_url, tracing=OpenTelemetryTracing(provider)) as mq:
        q = mq.queue("traced")
        message_id = await q.publish({"n": 1})
        await q.publish_many([{"n": 2}, {"n": 3}])
        seen: list[aioredmq.Message[Any]] = []

        async def handler(msg: aioredmq.Message[Any]) -> None:
            seen.append(msg)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: mq.run(q, handler))
            await wait_for(lambda: len(seen) == 3, 10, "three handled")
            tg.cancel_scope.cancel()
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    sends = [s for s in spans if s.kind == SpanKind.PRODUCER]
    processes = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert [s.name for s in sends] == ["send traced", "send traced"]
    assert sends[1].attributes is not None
    assert sends[1].attributes["messaging.batch.message_count"] == 2
    assert len(processes) == 3
    first = next(p for p in processes if p.attributes and p.attributes["messaging.message.id"] == message_id)
    assert first.name == "process traced"
    assert [link.context.span_id for link in first.links] == [sends[0].context.span_id]
    assert "traceparent" in seen[0].headers
    batch = [p for p in processes if p is not first]
    assert all(p.links[0].context.span_id == sends[1].context.span_id for p in batch), "both linked to the batch"


async def test_log_records_carry_the_queue_message_id_and_delivery(
    mq: aioredmq.Client, caplog: pytest.LogCaptureFixture
) -> None:
    q = mq.queue("logged", retry=aioredmq.RetryPolicy(max_deliveries=1))
    message_id = await q.publish("boom")
    async with q.consume(block_s=0.2) as consumer:
        msg = await consumer.__anext__()
        with caplog.at_level(logging.WARNING, logger="aioredmq.message"):
            async with msg.process():
                raise ValueError("boom")
    (record,) = [r for r in caplog.records if r.name == "aioredmq.message"]
    assert (record.queue, record.message_id, record.deliveries) == ("logged", message_id, 1)  # type: ignore[attr-defined]
    assert record.exc_info is not None, "the handler's exception is attached, not swallowed"


def test_metrics_and_tracing_must_be_the_right_kind() -> None:
    with pytest.raises(aioredmq.ConfigError, match="metrics="):
        aioredmq.connect("redis://127.0.0.1:1/0", metrics=object())  # type: ignore[arg-type]
    with pytest.raises(aioredmq.ConfigError, match="tracing="):
        aioredmq.connect("redis://127.0.0.1:1/0", tracing=object())  # type: ignore[arg-type]
