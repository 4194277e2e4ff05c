"""The gateway's side of the inference-table writer: records in, batches out to the writer process or the spool.

ClickHouse work (row encoding, inserts, migrations, spool replay) runs in a separate process (`child.py`), so a slow
or absent ClickHouse, or the chdb engine's own CPU time, never holds this process's GIL. Here, `submit()` encodes
the record on the caller's thread and gathers it into frames of 64 and batches (`pending.py`; records submitted
before the feeder runs wait unencoded, and the feeder encodes them); the feeder thread sends the batches down a
pipe; a receiver thread per writer process reads its acks. A batch stays in memory until acked, and goes to the
spool when the process refuses it, dies, or hangs, so nothing is lost and a replay carries the same records (and so
the same dedup token) as the first try. Encoded batches held in memory are bounded in rows and bytes: past either
bound the oldest go to the spool, and only when the spool refuses them too are they dropped (counted).
Under a supervisor with a chdb DSN, the writer process is the supervisor's, shared by every worker: a worker then
connects to it (`LOCKGATE_INFERENCE_SOCKET`) instead of starting one, and reconnects when the connection ends.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry

from gateway.inference.child import BATCH, BATCH_HEADER, FLUSH, GOODBYE, QUERY, REQUEST_ID, ChildOptions
from gateway.inference.holding import Batch, Holding
from gateway.inference.metrics import Mishaps, WriterMetrics
from gateway.inference.pending import PendingRecords
from gateway.inference.process import WriterProcess
from gateway.inference.shared import SOCKET_ENV
from gateway.inference.spool import Spool

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from policies.schema import InferenceTableConfig

log = logging.getLogger(__name__)

# Batches sent and not yet acked: enough to keep the process busy, few enough that a crash spools little.
WINDOW = 4
MIN_RESTART_S = 0.5
MAX_RESTART_S = 30.0
# A shared writer process is restarted by the supervisor: a worker tries again soon, connecting costs nothing.
MAX_RECONNECT_S = 5.0
# A batch unacked this long means the process hangs (one insert is bounded by the client's 30 s timeout).
HUNG_S = 120.0
# Past the stop deadline: time for the last spool writes after the process was killed.
EXIT_GRACE_S = 10.0
# A process that has written everything gets this long to close its engine, even at the deadline.
GOODBYE_GRACE_S = 1.0
QUEUE_MAX_BYTES = 256 * 1024 * 1024


class InferenceQueryError(RuntimeError):
    """A query through the writer process failed: ClickHouse is unavailable, the SQL failed, or no process runs."""


@dataclass
class _Flush:
    target: int
    done: threading.Event = field(default_factory=threading.Event)
    sent_to: WriterProcess | None = None


@dataclass
class _Query:
    done: threading.Event = field(default_factory=threading.Event)
    rows: list[tuple[Any, ...]] | None = None
    error: str | None = None


class InferenceWriter:
    """`submit()` only appends to an in-memory deque: no I/O, no serialization, no lock held for long.

    Rows land exactly once: each insert carries a dedup token derived from its batch's request ids, and a
    spooled batch is replayed as the same batch, so a retry of an insert that did land is discarded.
    """

    def __init__(
        self,
        dsn: str,
        database: str = "lockgate",
        *,
        log_payloads: bool = True,
        max_payload_bytes: int = 65_536,
        payload_ttl_days: int = 30,
        batch_rows: int = 20_000,
        flush_interval_ms: int = 5_000,
        queue_max: int = 100_000,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
        spool_dir: str | Path = "var/spool",
        registry: CollectorRegistry | None = None,
        connect_client: Callable[[], Client] | None = None,
        shared_socket: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.database = database
        self._interval_s = flush_interval_ms / 1000.0
        self._options = ChildOptions(dsn, database, log_payloads, max_payload_bytes, payload_ttl_days,
                                     str(spool_dir), self._interval_s, connect_client)
        self._shared_socket = shared_socket
        self._max_restart_s = MAX_RESTART_S if shared_socket is None else MAX_RECONNECT_S
        self.spool = Spool(spool_dir, shared=shared_socket is not None)
        self.registry = REGISTRY if registry is None else registry
        self.metrics = WriterMetrics.create(self.registry)
        self.metrics.queue_depth.set_function(lambda: self.queue_depth)
        self.metrics.queue_bytes.set_function(lambda: self.queue_bytes)
        self.metrics.spool_bytes.set_function(lambda: self.spool.bytes)
        self.metrics.spool_rows.set_function(lambda: self.spool.rows)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deadline = math.inf
        self._mishaps = Mishaps(self.metrics)
        # Guards the process handle, the encoded batches held, and the flush and query waiters.
        self._lock = threading.Lock()
        self._process: WriterProcess | None = None
        self._holding = Holding(self._lock, self.spool, self.metrics, queue_max, queue_max_bytes)
        self._pending = PendingRecords(batch_rows, queue_max, self._holding, self._mishaps)
        self._ready = self._holding.ready
        self._in_flight = self._holding.in_flight
        self._flushes: list[_Flush] = []
        self._flush_ids: dict[int, _Flush] = {}
        self._queries: dict[int, _Query] = {}
        self._ids = itertools.count(1)
        self._connected = False
        self._restart_at = 0.0
        self._restart_s = MIN_RESTART_S
        self._feeder: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: InferenceTableConfig, registry: CollectorRegistry | None = None) -> InferenceWriter:
        return cls(
            config.clickhouse, config.database, log_payloads=config.log_payloads,
            max_payload_bytes=config.max_payload_bytes, payload_ttl_days=config.payload_ttl_days,
            batch_rows=config.batch_rows, flush_interval_ms=config.flush_interval_ms, queue_max=config.queue_max,
            queue_max_bytes=config.queue_max_bytes, spool_dir=config.spool_dir, registry=registry,
            shared_socket=os.environ.get(SOCKET_ENV) or None,
        )

    @property
    def queue_depth(self) -> int:
        return self._pending.depth

    @property
    def queue_bytes(self) -> int:
        """Bytes of encoded records in memory: batches waiting or in flight, and the frames of the one being formed
        (records not yet encoded count in queue_depth)."""
        return self._holding.bytes() + self._pending.forming_bytes

    @property
    def connected(self) -> bool:
        """Whether the writer process holds a working ClickHouse connection, as it last reported."""
        return self._connected

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        if self._feeder is not None:
            return
        self._spawn()
        self._feeder = threading.Thread(target=self._feed_loop, name="lockgate-inference-feeder", daemon=True)
        self._feeder.start()
        self._pending.encode_on_submit = True

    def submit(self, record: dict[str, Any]) -> None:
        """Encode (or, before the feeder runs, queue) one record; never blocks on I/O. A full queue is handed whole to
        the feeder to spool."""
        if self._pending.submit(record):
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record submitted so far is in ClickHouse or the spool; also retries the spool now."""
        request = _Flush(self._pending.submitted)
        with self._lock:
            self._flushes.append(request)
            self._restart_at = 0.0
        self._wake.set()
        if request.done.wait(timeout):
            return True
        with self._lock:
            if request in self._flushes:
                self._flushes.remove(request)
        return request.done.is_set()

    def query(self, sql: str, timeout: float = 30.0) -> list[tuple[Any, ...]]:
        """Rows of one query run by the writer process, which owns a chdb engine: the way to read it meanwhile."""
        request = _Query()
        with self._lock:
            process = self._process
            query_id = next(self._ids)
            self._queries[query_id] = request
        try:
            if process is None:
                raise InferenceQueryError("the inference writer process is not running")
            try:
                process.send([QUERY + REQUEST_ID.pack(query_id) + sql.encode()])
            except (OSError, ValueError):
                raise InferenceQueryError("the inference writer process exited") from None
            if not request.done.wait(timeout):
                raise InferenceQueryError(f"no answer from the inference writer process within {timeout:g} s")
        finally:
            with self._lock:
                self._queries.pop(query_id, None)
        if request.rows is None:
            raise InferenceQueryError(request.error or "the inference writer process exited")
        return request.rows

    def close(self, timeout: float = 30.0) -> bool:
        """Write or spool everything queued, then end the writer process, all within `timeout`.

        True when it all went in order. Past the deadline the process is killed: its batches go to the spool.
        Rows the spool then holds (ClickHouse did not take them in time) are named in the log.
        """
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        feeder = self._feeder
        if feeder is None:
            self._pending.encode(drain_all=True)
            self._holding.bound(give_up=True)
            clean = True
        else:
            feeder.join(timeout)
            clean = not feeder.is_alive()
            if not clean:
                # The process hangs on ClickHouse: kill it, its batches in flight are spooled, the feeder spools the rest.
                process = self._process
                if process is not None:
                    process.kill()
                feeder.join(EXIT_GRACE_S)
                clean = False
        self._report_leftovers()
        return clean and (feeder is None or not feeder.is_alive())

    def _report_leftovers(self) -> None:
        in_memory = self._pending.rows() + self._holding.rows()
        if in_memory:
            self.metrics.rows_dropped.labels("shutdown").inc(in_memory)
            log.error("inference writer stopped with %d rows still in memory (neither ClickHouse nor the spool %s "
                      "took them in time): they are lost", in_memory, self.spool.directory)
        if self.spool.rows:
            log.warning("inference writer stopped with %d rows in the spool %s, not yet in ClickHouse: "
                        "the next start writes them", self.spool.rows, self.spool.directory)

    def _spawn(self) -> None:
        handlers = (self._on_message, self._on_exit, self._is_hung, lambda error: self._mishaps.error("receiver", error))
        try:
            if self._shared_socket is None:
                process = WriterProcess.start(self._options, *handlers)
            else:
                process = WriterProcess.connect(self._shared_socket, *handlers)
        except OSError as error:
            if self._shared_socket is None:
                log.exception("cannot start the inference writer process; spooling to %s", self.spool.directory)
            elif self._restart_s == MIN_RESTART_S:
                log.warning("cannot reach the shared inference writer at %s (%s); spooling to %s until it answers",
                            self._shared_socket, error, self.spool.directory)
            with self._lock:
                self._restart_at = time.monotonic() + self._restart_s
                self._restart_s = min(self._restart_s * 2, self._max_restart_s)
            return
        with self._lock:
            self._process = process

    def _feed_loop(self) -> None:
        last_flush = time.monotonic()
        blocked = False
        while True:
            # Blocked (window full, disk refusing): wait for an ack or the next interval, never spin.
            due = self._interval_s if blocked else last_flush + self._interval_s - time.monotonic()
            if self._stopping.is_set() and time.monotonic() < self._deadline:
                due = min(due, self._deadline - time.monotonic())
            self._wake.wait(max(due, 0.0))
            self._wake.clear()
            try:
                done, blocked, drained = self._feed_once(last_flush)
            except Exception as error:
                # A bug must not end the audit trail: count it, log it once, and carry on with the next pass.
                self._mishaps.error("feeder", error)
                blocked = True
                continue
            if drained:
                last_flush = time.monotonic()
            if done:
                return

    def _feed_once(self, last_flush: float) -> tuple[bool, bool, bool]:
        """One pass: (the writer is done, it is blocked, everything queued was taken)."""
        stopping = self._stopping.is_set()
        if self._process is None and not stopping and time.monotonic() >= self._restart_at:
            self._spawn()
        drain_all = stopping or bool(self._flushes) or time.monotonic() >= last_flush + self._interval_s
        self._pending.encode(drain_all)
        self._send_ready()
        self._holding.bound(give_up=stopping and time.monotonic() >= self._deadline)
        blocked = bool(self._ready)
        self._advance_flushes()
        if stopping and not self._pending.rows() and not self._ready and not self._in_flight:
            self._end_process()
            return True, blocked, True
        # Drained even when blocked: the partial batch waits in `ready` for an ack, and were the interval to count
        # from an earlier pass, every ack would drain again and send the few records queued since as a batch.
        return False, blocked, drain_all

    def _send_ready(self) -> None:
        """Encoded batches, oldest first, to the process while its window has room; to the spool without one."""
        while True:
            with self._lock:
                process = self._process
                if not self._ready or (process is not None and self._window_full(self._ready[0])):
                    return
                batch = self._ready.popleft()
                if process is not None:
                    batch_id = next(self._ids)
                    batch.sent_at = time.monotonic()
                    self._in_flight[batch_id] = batch
                    self._holding.taken += batch.rows
            if process is None:
                if not self._holding.spool_ready(batch):
                    return
                continue
            try:
                process.send([BATCH + BATCH_HEADER.pack(batch_id, len(batch.frames)), *batch.frames])
            except (OSError, ValueError):
                process.kill()

    def _window_full(self, batch: Batch) -> bool:
        """WINDOW batches in flight, or one more would pass queue_max_bytes (one is always let through)."""
        if not self._in_flight:
            return False
        in_flight = sum(sent.size for sent in self._in_flight.values())
        return len(self._in_flight) >= WINDOW or in_flight + batch.size > self._holding.max_bytes

    def _advance_flushes(self) -> None:
        to_send: list[tuple[WriterProcess, int]] = []
        with self._lock:
            for request in list(self._flushes):
                if request.sent_to is not None or self._holding.taken < request.target:
                    continue
                if self._process is None:
                    # Everything is spooled; done unless a process is about to start and can replay the spool.
                    restarting = not self._stopping.is_set() and time.monotonic() >= self._restart_at
                    if not self._in_flight and not restarting:
                        self._flushes.remove(request)
                        request.done.set()
                    continue
                flush_id = next(self._ids)
                request.sent_to = self._process
                self._flush_ids[flush_id] = request
                to_send.append((self._process, flush_id))
        for process, flush_id in to_send:
            try:
                process.send([FLUSH + REQUEST_ID.pack(flush_id)])
            except (OSError, ValueError):
                process.kill()

    def _end_process(self) -> None:
        process = self._process
        if process is not None:
            try:
                process.send([GOODBYE])
            except (OSError, ValueError):
                process.kill()
            process.stop(max(self._deadline - time.monotonic(), GOODBYE_GRACE_S))
        with self._lock:
            for request in self._flushes:
                request.done.set()
            self._flushes.clear()

    def _on_message(self, process: WriterProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ack":
            self._on_ack(message[1], message[2])
        elif kind == "state":
            self._connected = message[1]
        elif kind == "replayed":
            self.spool.forget(message[1], message[2])
            self.metrics.rows_written.inc(message[1])
        elif kind == "rejected":
            self.spool.forget(message[1], message[2])
            self.metrics.rows_dropped.labels(message[3]).inc(message[1])
        elif kind == "spool":
            self.spool.recount(message[1], message[2])
        elif kind == "flushed":
            with self._lock:
                request = self._flush_ids.pop(message[1], None)
                if request in self._flushes:
                    self._flushes.remove(request)
            if request is not None:
                request.done.set()
        elif kind == "result":
            with self._lock:
                query = self._queries.get(message[1])
            if query is not None:
                query.rows, query.error = message[2], message[3]
                query.done.set()
        elif kind == "unencodable":
            self._mishaps.unencodable(message[1], message[3], message[2])
        elif kind == "error":
            self.metrics.errors.labels("writer_process").inc()

    def _on_ack(self, batch_id: int, status: str) -> None:
        with self._lock:
            batch = self._in_flight.pop(batch_id, None)
        if batch is None:
            return
        if status == "written":
            self.metrics.rows_written.inc(batch.rows)
            self._restart_s = MIN_RESTART_S
        else:
            if status == "failed":
                self.metrics.rows_failed.inc(batch.rows)
            self._holding.spool_returned(batch)
        self._wake.set()

    def _on_exit(self, process: WriterProcess) -> None:
        stopping = self._stopping.is_set()
        with self._lock:
            if self._process is process:
                self._process = None
            self._connected = False
            lost = list(self._in_flight.values())
            self._in_flight.clear()
            for flush_id, request in list(self._flush_ids.items()):
                if request.sent_to is process:
                    request.sent_to = None
                    del self._flush_ids[flush_id]
            for query in self._queries.values():
                query.done.set()
            # A flush waiting means "retry now"; otherwise a process that keeps dying is restarted ever more slowly.
            self._restart_at = time.monotonic() + (0.0 if self._flushes else self._restart_s)
            self._restart_s = min(self._restart_s * 2, self._max_restart_s)
        for batch in lost:
            self._holding.spool_returned(batch)
        if not stopping:
            log.warning("inference writer process %s ended (%s); %d batches spooled, %s", process.pid, process.ending,
                        len(lost), "restarting" if self._shared_socket is None else "reconnecting")
            self.metrics.process_restarts.inc()
        self._wake.set()

    def _is_hung(self) -> bool:
        oldest = min((batch.sent_at for batch in list(self._in_flight.values())), default=None)
        return oldest is not None and time.monotonic() - oldest > HUNG_S

