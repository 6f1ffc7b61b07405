"""What the hub exposes at /metrics, in prometheus_client's exposition format.

The counts are plain attributes the hub's actors bump on their hot paths
(`metrics.frames_sent += 1`); a collector reads them at scrape time. The
commit-time histogram is prometheus_client's own; the frame-size one, bumped
for every frame read, is a `Buckets` (prometheus_client's takes a lock and
walks its buckets in Python: a few percent of a fleet's per-frame CPU). Each
hub has its own registry, so several hubs in one process (tests) keep apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import attrs
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Inbound WebSocket frames: a single record is a few hundred bytes, a full
# batch up to the frame limit (4 MiB).
_FRAME_BUCKETS = tuple(float(4**n) for n in range(4, 12))  # 256 B .. 4 MiB

# (attribute, metric name without _total, kind, help)
_SCALARS = (
    ("records_ingested", "keruta_records_ingested", "counter", "Records newly stored (duplicates not counted)"),
    ("records_duplicate", "keruta_records_duplicate", "counter", "Records received again and not stored twice"),
    ("frames_received", "keruta_frames_received", "counter", "WebSocket frames received"),
    ("frames_sent", "keruta_frames_sent", "counter", "WebSocket frames sent"),
    ("subscribers", "keruta_subscribers", "gauge", "Live subscriptions"),
    ("connections", "keruta_websocket_connections", "gauge", "Open WebSocket connections"),
    ("slow_consumers", "keruta_slow_consumers", "counter", "Subscribers cut off as SLOW_CONSUMER"),
    ("subscriber_queue_bytes_peak", "keruta_subscriber_queue_bytes_peak", "gauge",
     "The most bytes any one connection has held queued for sending"),
    ("ingest_queue_bytes", "keruta_ingest_queue_bytes", "gauge",
     "Bytes of writes (WebSocket frames, REST bodies) the hub holds, read and not yet answered"),
    ("ingest_queue_bytes_peak", "keruta_ingest_queue_bytes_peak", "gauge",
     "The most bytes of writes (WebSocket frames, REST bodies) the hub has held at once"),
    ("store_failures", "keruta_store_failures", "counter", "Store operations that found the store unavailable"),
    ("parked_tasks", "keruta_parked_tasks", "counter",
     "Tasks whose row another session held, committed apart from the others"),
)


@attrs.define(eq=False)
class Buckets:
    """A histogram bumped from the event loop only (no lock): a count per
    bucket (`bounds` ascending, then +Inf) and the sum, read at scrape time."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.total)


@attrs.define(eq=False)
class Metrics:
    records_ingested: int = 0
    records_duplicate: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    subscribers: int = 0
    connections: int = 0
    slow_consumers: int = 0
    subscriber_queue_bytes_peak: int = 0
    ingest_queue_bytes: int = 0
    ingest_queue_bytes_peak: int = 0
    store_failures: int = 0
    parked_tasks: int = 0
    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    write_batch: Histogram = attrs.field(init=False)
    frame_bytes: Buckets = attrs.field(factory=lambda: Buckets(_FRAME_BUCKETS))

    def __attrs_post_init__(self) -> None:
        self.write_batch = Histogram(
            "keruta_write_batch_seconds", "Time to commit one write batch to the store",
            registry=self.registry, buckets=_LATENCY_BUCKETS,
        )
        self.registry.register(_Counts(self))

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _Counts(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for attribute, name, kind, documentation in _SCALARS:
            value = getattr(self.metrics, attribute)
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, documentation, value=value)
        yield self.metrics.frame_bytes.family("keruta_frame_bytes", "Size of the WebSocket frames received")
        errors = CounterMetricFamily("keruta_errors", "Error answers and frames, by code", labels=["code"])
        for code, n in sorted((self.metrics.errors or {"none": 0}).items()):
            errors.add_metric([code], n)
        yield errors
