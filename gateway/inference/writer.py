"""The background writer: records in, batched inserts out, a disk spool in between when ClickHouse is away."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DataError
from prometheus_client import REGISTRY, CollectorRegistry

from gateway.inference.metrics import WriterMetrics
from gateway.inference.rows import COLUMNS, batch_token, to_row
from gateway.inference.spool import Spool
from gateway.inference.store import DEDUP_SETTINGS, connect, migrate

if TYPE_CHECKING:
    from policies.schema import InferenceTableConfig

log = logging.getLogger(__name__)

MIN_RETRY_S = 0.5
MAX_RETRY_S = 30.0
# Errors that say the batch itself cannot be encoded: replaying it would fail forever and block the spool.
POISON_ERRORS = (DataError, TypeError, ValueError, OverflowError)


class InferenceWriter:
    """Owns one writer thread and one spill thread; `submit()` only appends to an in-memory deque.

    Rows land exactly once: each insert carries a dedup token derived from its batch's request ids,
    and a spooled batch is replayed as the same batch, so a retry of an insert that did land is discarded.
    """

    def __init__(
        self,
        dsn: str,
        database: str = "lockgate",
        *,
        log_payloads: bool = True,
        max_payload_bytes: int = 65_536,
        payload_ttl_days: int = 30,
        batch_rows: int = 1_000,
        flush_interval_ms: int = 1_000,
        queue_max: int = 100_000,
        spool_dir: str | Path = "var/spool",
        registry: CollectorRegistry | None = None,
        connect_client: Callable[[], Client] | None = None,
    ) -> None:
        self.dsn = dsn
        self.database = database
        self._log_payloads = log_payloads
        self._max_payload_bytes = max_payload_bytes
        self._payload_ttl_days = payload_ttl_days
        self._batch_rows = batch_rows
        self._interval_s = flush_interval_ms / 1000.0
        self._queue_max = queue_max
        self._connect = connect_client or (lambda: connect(dsn))
        self.spool = Spool(spool_dir)
        self.registry = REGISTRY if registry is None else registry
        self.metrics = WriterMetrics.create(self.registry)
        self.metrics.queue_depth.set_function(lambda: self.queue_depth)
        self.metrics.spool_bytes.set_function(lambda: self.spool.bytes)
        self.metrics.spool_rows.set_function(lambda: self.spool.rows)
        self._queue: deque[dict[str, Any]] = deque()
        self._submit_lock = threading.Lock()
        self._spills: queue.Queue[deque[dict[str, Any]] | None] = queue.Queue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_waiters: deque[threading.Event] = deque()
        self._client: Client | None = None
        self._retry_at = 0.0
        self._retry_s = MIN_RETRY_S
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, config: InferenceTableConfig, registry: CollectorRegistry | None = None) -> InferenceWriter:
        return cls(
            config.clickhouse, config.database, log_payloads=config.log_payloads,
            max_payload_bytes=config.max_payload_bytes, payload_ttl_days=config.payload_ttl_days,
            batch_rows=config.batch_rows, flush_interval_ms=config.flush_interval_ms, queue_max=config.queue_max,
            spool_dir=config.spool_dir, registry=registry,
        )

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._write_loop, name="lockgate-inference-writer", daemon=True),
            threading.Thread(target=self._spill_loop, name="lockgate-inference-spill", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks on I/O. A full queue is handed whole to the spill thread."""
        with self._submit_lock:
            pending = self._queue
            pending.append(record)
            depth = len(pending)
            if depth >= self._queue_max:
                self._queue = deque()
                self._spills.put(pending)
        if depth % self._batch_rows == 0:
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record submitted so far is in ClickHouse or the spool; also retries the spool now."""
        deadline = time.monotonic() + timeout
        done = threading.Event()
        self._flush_waiters.append(done)
        self._retry_at = 0.0
        self._wake.set()
        if not done.wait(timeout):
            return False
        return self._wait_spills(deadline)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the threads after writing everything queued; whatever they could not finish goes to the spool."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        self._spills.put(None)
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        finished = not any(thread.is_alive() for thread in self._threads)
        with self._submit_lock:
            leftover, self._queue = self._queue, deque()
        if leftover and finished:
            self._spool_batch(list(leftover))
        if self._client is not None and finished:
            self._client.close()
            self._client = None
        return finished and not leftover

    def _wait_spills(self, deadline: float) -> bool:
        while self._spills.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _write_loop(self) -> None:
        last_flush = time.monotonic()
        while True:
            self._wake.wait(max(last_flush + self._interval_s - time.monotonic(), 0.0))
            self._wake.clear()
            waiters = [self._flush_waiters.popleft() for _ in range(len(self._flush_waiters))]
            stopping = self._stopping.is_set()
            drain_all = bool(waiters) or stopping or time.monotonic() >= last_flush + self._interval_s
            self._ensure_client()
            self._replay_spool()
            self._drain(drain_all)
            self._replay_spool()
            if drain_all:
                last_flush = time.monotonic()
            for waiter in waiters:
                waiter.set()
            if stopping:
                return

    def _spill_loop(self) -> None:
        while (pending := self._spills.get()) is not None:
            try:
                while batch := _pop_up_to(pending, self._batch_rows):
                    self._spool_batch(batch)
            finally:
                self._spills.task_done()
        self._spills.task_done()

    def _drain(self, drain_all: bool) -> None:
        while len(self._queue) >= self._batch_rows or (drain_all and self._queue):
            batch = _pop_up_to(self._queue, self._batch_rows)
            if batch and not self._insert_or_spool(batch):
                return

    def _insert_or_spool(self, batch: list[dict[str, Any]]) -> bool:
        if self._client is not None and self.spool.rows == 0:
            try:
                self._insert(batch)
                return True
            except POISON_ERRORS:
                log.exception("inference batch of %d rows could not be encoded; spooling it", len(batch))
            except Exception as error:
                self._lost_connection(error)
            self.metrics.rows_failed.inc(len(batch))
        return self._spool_batch(batch)

    def _spool_batch(self, batch: list[dict[str, Any]]) -> bool:
        try:
            self.spool.write(batch)
        except OSError:
            log.exception("inference spool %s is not writable; keeping %d rows in memory", self.spool.directory,
                          len(batch))
            with self._submit_lock:
                self._queue.extendleft(reversed(batch))
            return False
        self.metrics.rows_spooled.inc(len(batch))
        return True

    def _insert(self, records: list[dict[str, Any]]) -> None:
        assert self._client is not None
        rows = [to_row(record, log_payloads=self._log_payloads, max_payload_bytes=self._max_payload_bytes)
                for record in records]
        settings = {**DEDUP_SETTINGS, "insert_deduplication_token": batch_token(records)}
        self._client.insert(f"{self.database}.inference", rows, column_names=COLUMNS, settings=settings)
        self.metrics.rows_written.inc(len(rows))

    def _replay_spool(self) -> None:
        if self._client is None or self.spool.rows == 0:
            return
        for path in self.spool.files():
            if self._client is None:
                return
            try:
                records = self.spool.read(path)
            except (OSError, ValueError):
                self.metrics.rows_dropped.labels("unreadable_spool").inc(self.spool.reject(path))
                continue
            try:
                self._insert(records)
            except POISON_ERRORS:
                log.exception("spooled batch %s cannot be encoded; moved to %s", path, self.spool.rejected_directory)
                self.metrics.rows_dropped.labels("rejected").inc(self.spool.reject(path))
                continue
            except Exception as error:
                self._lost_connection(error)
                return
            self.spool.remove(path, len(records))

    def _ensure_client(self) -> None:
        if self._client is not None or time.monotonic() < self._retry_at:
            return
        try:
            client = self._connect()
            migrate(client, self.database, self._payload_ttl_days)
        except Exception as error:
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)
            log.warning("ClickHouse %s unavailable (%s); spooling to %s", _safe_dsn(self.dsn), error,
                        self.spool.directory)
            return
        self._client = client
        self._retry_s = MIN_RETRY_S

    def _lost_connection(self, error: Exception) -> None:
        log.warning("insert into ClickHouse %s failed (%s); spooling and reconnecting", _safe_dsn(self.dsn), error)
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)


def _pop_up_to(pending: deque[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    batch = []
    try:
        for _ in range(count):
            batch.append(pending.popleft())
    except IndexError:
        pass
    return batch


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    scheme, sep, rest = dsn.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.partition(':')[0]}{at}{host}" if at else dsn
