"""Prometheus metrics (``pip install 'aioredmq[prometheus]'``).

    metrics = PrometheusMetrics()            # registers with the default registry
    async with aioredmq.connect(url, metrics=metrics) as mq: ...
    await metrics.refresh(mq.queue("orders"), mq.stream("events"))   # depth and lag gauges

Counters and the handler-duration histogram move as the library works. Queue depth and
group lag are read from Redis by :meth:`PrometheusMetrics.refresh`: call it from the
scrape endpoint, or periodically.
"""

from __future__ import annotations

from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aioredmq.prometheus needs prometheus_client: pip install 'aioredmq[prometheus]'") from exc

from .observe import Metrics
from .partitioned import PartitionedQueue
from .queue import Queue
from .stream import Stream

__all__ = ("PrometheusMetrics",)


class PrometheusMetrics(Metrics):
    """aioredmq's metrics, named ``<namespace>_...`` and labelled by ``source``."""

    def __init__(self, *, registry: CollectorRegistry = REGISTRY, namespace: str = "aioredmq") -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["source"], namespace=namespace, registry=registry)

        self._published = counter("published", "Messages Redis confirmed.")
        self._delivered = counter("delivered", "Messages handed out to handlers.")
        self._redelivered = counter("redelivered", "Deliveries after the first of a message.")
        self._acked = counter("acked", "Messages acked.")
        self._nacked = counter("nacked", "Messages given back for another try.")
        self._dead = counter("dead_lettered", "Messages moved to dead-letter.")
        self._late = counter("late_acks", "Settles that came after the lease was lost.")
        self._duration = Histogram(
            "handler_duration_seconds",
            "Time in the runner's handler.",
            ["source", "outcome"],
            namespace=namespace,
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._depth = Gauge(
            "messages", "Messages by state, as of the last refresh().", ["source", "state"], namespace=namespace,
            registry=registry,
        )  # fmt: skip
        self._lag = Gauge(
            "group_lag", "Entries a stream group has not been given yet.", ["source", "group"], namespace=namespace,
            registry=registry,
        )  # fmt: skip
        self._pending = Gauge(
            "group_pending", "Entries a stream group was given and has not acked.", ["source", "group"],
            namespace=namespace, registry=registry,
        )  # fmt: skip

    def published(self, source: str, count: int) -> None:
        self._published.labels(source).inc(count)

    def delivered(self, source: str, deliveries: int) -> None:
        self._delivered.labels(source).inc()
        if deliveries > 1:
            self._redelivered.labels(source).inc()

    def acked(self, source: str) -> None:
        self._acked.labels(source).inc()

    def nacked(self, source: str) -> None:
        self._nacked.labels(source).inc()

    def dead_lettered(self, source: str) -> None:
        self._dead.labels(source).inc()

    def late_acks(self, source: str, count: int) -> None:
        self._late.labels(source).inc(count)

    def handled(self, source: str, seconds: float, ok: bool) -> None:
        self._duration.labels(source, "ok" if ok else "error").observe(seconds)

    async def refresh(self, *sources: Queue[Any] | Stream[Any] | PartitionedQueue[Any]) -> None:
        """Read depth (ready, in flight, delayed, dead) and group lag and pending from Redis."""
        for source in sources:
            if isinstance(source, PartitionedQueue):
                await self.refresh(*source.partitions)
            elif isinstance(source, Queue):
                q = await source.stats()
                for state, value in (("ready", q.ready), ("in_flight", q.in_flight), ("delayed", q.delayed),
                                     ("dead", q.dead)):  # fmt: skip
                    self._depth.labels(source.name, state).set(value)
            else:
                s = await source.stats()
                self._depth.labels(source.name, "length").set(s.length)
                self._depth.labels(source.name, "delayed").set(s.delayed)
                for group, info in s.groups.items():
                    if info.lag is not None:
                        self._lag.labels(source.name, group).set(info.lag)
                    self._pending.labels(source.name, group).set(info.pending)
                    self._depth.labels(f"{source.name}/{group}", "dead").set(info.dead)
