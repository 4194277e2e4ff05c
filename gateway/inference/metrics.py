"""Prometheus metrics of the inference-table writer, and the log of its mishaps (once per kind)."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from gateway.inference.shared import SOCKET_ENV
from gateway.metrics import SampledGauge

log = logging.getLogger("gateway.inference.writer")


@dataclass(frozen=True)
class WriterMetrics:
    queue_depth: SampledGauge
    queue_bytes: SampledGauge
    spool_bytes: SampledGauge
    spool_rows: SampledGauge
    rows_written: Counter
    rows_failed: Counter
    rows_spooled: Counter
    rows_dropped: Counter
    process_restarts: Counter
    records_unencodable: Counter
    errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> WriterMetrics:
        """The writer metrics of a registry, made once: a later writer in the same process (a restarted app, the
        tests) takes them over; counters keep counting for the process, gauges read the newest writer."""
        registry = REGISTRY if registry is None else registry
        made = _MADE.get(registry)
        if made is None:
            made = _MADE[registry] = cls._make(registry)
        return made

    @classmethod
    def _make(cls, registry: CollectorRegistry) -> WriterMetrics:
        prefix = "lockgate_inference_"
        # Under the supervisor: what waits in memory adds up over the workers' writers; the spool is one folder that
        # each writer counts whole at its start, so the largest count is the closest; workers that share the
        # supervisor's writer process (chdb) each count their own files in it, which add up.
        spool_mode = "livesum" if os.environ.get(SOCKET_ENV) else "livemax"
        return cls(
            queue_depth=SampledGauge(f"{prefix}queue_depth", "Records waiting in memory for the writer",
                                     registry=registry, multiprocess_mode="livesum"),
            queue_bytes=SampledGauge(
                f"{prefix}queue_bytes", "Bytes of encoded batches held in memory (waiting or being written)",
                registry=registry, multiprocess_mode="livesum",
            ),
            spool_bytes=SampledGauge(f"{prefix}spool_bytes", "Bytes of batches spooled on disk", registry=registry,
                                     multiprocess_mode=spool_mode),
            spool_rows=SampledGauge(f"{prefix}spool_rows", "Rows of batches spooled on disk", registry=registry,
                                    multiprocess_mode=spool_mode),
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
            records_unencodable=Counter(
                f"{prefix}records_unencodable",
                "Records written with a value or payload replaced by a marker because it could not be encoded, by reason",
                ["reason"], registry=registry,
            ),
            errors=Counter(
                f"{prefix}errors", "Unexpected errors the writer survived, by where they happened", ["where"],
                registry=registry,
            ),
        )


_MADE: weakref.WeakKeyDictionary[CollectorRegistry, WriterMetrics] = weakref.WeakKeyDictionary()


@dataclass
class Mishaps:
    """Counts what went wrong and logs each kind once: one hostile record repeated must not flood the log."""

    metrics: WriterMetrics
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _first(self, where: str, kind: str) -> bool:
        with self._lock:
            if (where, kind) in self._seen:
                return False
            self._seen.add((where, kind))
            return True

    def unencodable(self, reason: str, request_id: str, count: int = 1) -> None:
        self.metrics.records_unencodable.labels(reason).inc(count)
        if self._first("unencodable", reason):
            log.warning("inference record %s could not be encoded (%s): it is written with the value replaced by a "
                        "marker (logged once per reason, counted in lockgate_inference_records_unencodable_total)",
                        request_id, reason)

    def error(self, where: str, error: BaseException) -> None:
        self.metrics.errors.labels(where).inc()
        if self._first(where, type(error).__name__):
            log.error("inference writer %s: unexpected %s, carrying on (logged once per kind)", where,
                      type(error).__name__, exc_info=error)
