"""Prometheus metrics of the inference-table writer."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class WriterMetrics:
    queue_depth: Gauge
    spool_bytes: Gauge
    spool_rows: Gauge
    rows_written: Counter
    rows_failed: Counter
    rows_spooled: Counter
    rows_dropped: Counter
    process_restarts: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> WriterMetrics:
        registry = REGISTRY if registry is None else registry
        prefix = "lockgate_inference_"
        return cls(
            queue_depth=Gauge(f"{prefix}queue_depth", "Records waiting in memory for the writer", registry=registry),
            spool_bytes=Gauge(f"{prefix}spool_bytes", "Bytes of batches spooled on disk", registry=registry),
            spool_rows=Gauge(f"{prefix}spool_rows", "Rows of batches spooled on disk", registry=registry),
            rows_written=Counter(f"{prefix}rows_written", "Rows inserted into ClickHouse", registry=registry),
            rows_failed=Counter(
                f"{prefix}rows_failed", "Rows whose insert failed (they go to the spool)", registry=registry
            ),
            rows_spooled=Counter(f"{prefix}rows_spooled", "Rows written to the disk spool", registry=registry),
            rows_dropped=Counter(
                f"{prefix}rows_dropped", "Rows set aside on purpose, by reason", ["reason"], registry=registry
            ),
            process_restarts=Counter(
                f"{prefix}process_restarts", "Times the writer process ended unexpectedly and was started again",
                registry=registry,
            ),
        )
