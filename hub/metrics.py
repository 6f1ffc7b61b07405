"""Counters the hub exposes at /metrics, in Prometheus text format."""

from __future__ import annotations

import bisect

import attrs

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@attrs.define
class Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * (len(_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(_BUCKETS, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.n}")
        return lines


@attrs.define
class Metrics:
    records_ingested: int = 0  # newly stored (duplicates not counted)
    records_duplicate: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    subscribers: int = 0
    connections: int = 0
    slow_consumers: int = 0
    # The most bytes any one connection has held queued for sending.
    subscriber_queue_bytes_peak: int = 0
    write_batch: Histogram = attrs.field(factory=Histogram)
    store_failures: int = 0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def render(self) -> str:
        out = [
            "# TYPE keruta_records_ingested_total counter",
            f"keruta_records_ingested_total {self.records_ingested}",
            "# TYPE keruta_records_duplicate_total counter",
            f"keruta_records_duplicate_total {self.records_duplicate}",
            "# TYPE keruta_frames_received_total counter",
            f"keruta_frames_received_total {self.frames_received}",
            "# TYPE keruta_frames_sent_total counter",
            f"keruta_frames_sent_total {self.frames_sent}",
            "# TYPE keruta_subscribers gauge",
            f"keruta_subscribers {self.subscribers}",
            "# TYPE keruta_websocket_connections gauge",
            f"keruta_websocket_connections {self.connections}",
            "# TYPE keruta_slow_consumers_total counter",
            f"keruta_slow_consumers_total {self.slow_consumers}",
            "# TYPE keruta_subscriber_queue_bytes_peak gauge",
            f"keruta_subscriber_queue_bytes_peak {self.subscriber_queue_bytes_peak}",
            "# TYPE keruta_store_failures_total counter",
            f"keruta_store_failures_total {self.store_failures}",
            "# TYPE keruta_errors_total counter",
        ]
        if not self.errors:
            out.append('keruta_errors_total{code="none"} 0')
        for code, n in sorted(self.errors.items()):
            out.append(f'keruta_errors_total{{code="{code}"}} {n}')
        out += self.write_batch.render("keruta_write_batch_seconds")
        return "\n".join(out) + "\n"
