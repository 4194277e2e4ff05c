"""Encoded batches the gateway's process holds in memory, and their way to the spool when memory is full.

Held are the batches ready to send and the ones in flight (sent, not acked). Both are bounded in rows and bytes:
past either bound the oldest ready batch goes to the spool, and only when the spool refuses it too is it dropped,
counted and logged. `taken` counts the records that left memory for the writer process, the spool or the bin:
a flush waits for it to reach the records submitted before it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.inference.metrics import WriterMetrics
from gateway.inference.spool import Spool
from gateway.inference.wire import FRAME_ROWS, OnUnencodable, encode_frame

log = logging.getLogger("gateway.inference.writer")

SPOOL_LOG_S = 10.0


@dataclass
class Batch:
    frames: list[bytes]
    rows: int
    sent_at: float = field(default_factory=time.monotonic)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(frame) for frame in self.frames)

    @classmethod
    def encode(cls, records: Sequence[dict[str, Any]], on_unencodable: OnUnencodable) -> Batch:
        frames = []
        for start in range(0, len(records), FRAME_ROWS):
            frames.append(encode_frame(records[start:start + FRAME_ROWS], on_unencodable))
            # Hands the GIL to the event loop between frames, should it be waiting for it.
            time.sleep(0)
        return cls(frames, len(records))


class Holding:
    """Every attribute is guarded by `lock`, which the writer shares for its own state."""

    def __init__(self, lock: threading.Lock, spool: Spool, metrics: WriterMetrics, max_rows: int,
                 max_bytes: int) -> None:
        self.lock = lock
        self.spool = spool
        self.metrics = metrics
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.ready: deque[Batch] = deque()
        self.in_flight: dict[int, Batch] = {}
        self.taken = 0
        self._spool_logged_at = -math.inf

    def totals(self) -> tuple[int, int]:
        """Rows and bytes held; the caller holds the lock."""
        batches = [*self.ready, *self.in_flight.values()]
        return sum(batch.rows for batch in batches), sum(batch.size for batch in batches)

    def rows(self) -> int:
        with self.lock:
            return self.totals()[0]

    def bytes(self) -> int:
        with self.lock:
            return self.totals()[1]

    def bound(self, give_up: bool) -> None:
        """Spool the oldest ready batches while over a bound (all of them when giving up); drop what the spool refuses."""
        with self.lock:
            rows, size = self.totals()
        dropped = 0
        while give_up or rows > self.max_rows or size > self.max_bytes:
            with self.lock:
                if not self.ready:
                    break
                batch = self.ready.popleft()
            rows, size = rows - batch.rows, size - batch.size
            if self.spool_ready(batch, keep_refused=False):
                continue
            with self.lock:
                self.taken += batch.rows
            dropped += batch.rows
        if dropped:
            self.metrics.rows_dropped.labels("memory_full").inc(dropped)
            log.error("inference spool %s refuses batches and memory is at its bound: %d rows dropped (counted in "
                      'lockgate_inference_rows_dropped_total{reason="memory_full"})', self.spool.directory, dropped)

    def spool_ready(self, batch: Batch, *, keep_refused: bool = True) -> bool:
        """Spool a batch taken from the ready ones; one the disk refuses goes back in front when keep_refused."""
        if self._spool(batch):
            with self.lock:
                self.taken += batch.rows
            return True
        if keep_refused:
            with self.lock:
                self.ready.appendleft(batch)
        return False

    def spool_returned(self, batch: Batch) -> None:
        """Spool a batch the process gave back; one the disk refuses waits in memory, in front, for the next try."""
        if not self._spool(batch):
            with self.lock:
                self.ready.appendleft(batch)
                self.taken -= batch.rows

    def _spool(self, batch: Batch) -> bool:
        try:
            self.spool.write_frames(batch.frames, batch.rows)
        except OSError as error:
            now = time.monotonic()
            if now >= self._spool_logged_at + SPOOL_LOG_S:
                self._spool_logged_at = now
                log.error("inference spool %s is not writable (%s); holding rows in memory up to queue_max_bytes",
                          self.spool.directory, error)
            return False
        self.metrics.rows_spooled.inc(batch.rows)
        return True
