"""Records submitted and not yet in a batch: queued as they come, then encoded a frame at a time into the batch
being formed; a queue that reaches queue_max is set aside whole (spilled) and encoded as whole batches.

`submit` runs on the event loop's thread and only appends; `encode` runs on the writer's feeder thread, the only one
that touches the forming batch. Frames wait for their batch as bytes (~1.1 KB a record instead of ~1.8 KB and six
objects the cyclic collector walks), so a large batch_rows costs the gateway little memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from gateway.inference.holding import Batch, Holding
from gateway.inference.metrics import Mishaps
from gateway.inference.wire import FRAME_ROWS, encode_frame


class PendingRecords:
    def __init__(self, batch_rows: int, queue_max: int, holding: Holding, mishaps: Mishaps) -> None:
        self._batch_rows = batch_rows
        self._queue_max = queue_max
        self._holding = holding
        self._mishaps = mishaps
        self._wake_every = min(FRAME_ROWS, batch_rows)
        self._lock = threading.Lock()
        self._queue: deque[dict[str, Any]] = deque()
        self._spills: deque[deque[dict[str, Any]]] = deque()
        self._forming: list[bytes] = []
        self._forming_rows = 0
        self.submitted = 0

    @property
    def depth(self) -> int:
        """Records not yet encoded, spilled ones aside."""
        return len(self._queue)

    @property
    def forming_bytes(self) -> int:
        return sum(len(frame) for frame in list(self._forming))

    def rows(self) -> int:
        """Every record held here: queued, spilled, or encoded into the forming batch."""
        with self._lock:
            return len(self._queue) + sum(len(spill) for spill in self._spills) + self._forming_rows

    def submit(self, record: dict[str, Any]) -> bool:
        """Appends one record; True when the feeder has a frame (or a spill) to encode."""
        with self._lock:
            pending = self._queue
            pending.append(record)
            self.submitted += 1
            depth = len(pending)
            if depth >= self._queue_max:
                self._queue = deque()
                self._spills.append(pending)
        return depth % self._wake_every == 0 or depth >= self._queue_max

    def encode(self, drain_all: bool) -> None:
        """Spilled records as whole batches; queued ones a frame at a time into the forming batch, which goes to the
        ready batches once it holds batch_rows (and, when drain_all, with whatever it holds)."""
        while True:
            with self._lock:
                spilled = bool(self._spills)
                if spilled:
                    pending = self._spills[0]
                    take = self._batch_rows
                else:
                    pending = self._queue
                    take = min(FRAME_ROWS, self._batch_rows - self._forming_rows)
                    if len(pending) < take and not (drain_all and pending):
                        break
                records = [pending.popleft() for _ in range(min(take, len(pending)))]
                if spilled and not pending:
                    self._spills.popleft()
            if not records:
                continue
            if spilled:
                self._encode_batch(records)
                continue
            try:
                frame = encode_frame(records, self._mishaps.unencodable)
            except Exception as error:
                self._encoding_failed(error, len(records))
            else:
                self._forming.append(frame)
                self._forming_rows += len(records)
            if self._forming_rows >= self._batch_rows:
                self._batch_formed()
            # Hands the GIL to the event loop between frames, should it be waiting for it.
            time.sleep(0)
        if drain_all and self._forming:
            self._batch_formed()

    def _batch_formed(self) -> None:
        batch = Batch(self._forming, self._forming_rows)
        self._forming, self._forming_rows = [], 0
        with self._holding.lock:
            self._holding.ready.append(batch)

    def _encode_batch(self, records: list[dict[str, Any]]) -> None:
        try:
            batch = Batch.encode(records, self._mishaps.unencodable)
        except Exception as error:
            self._encoding_failed(error, len(records))
            return
        with self._holding.lock:
            self._holding.ready.append(batch)

    def _encoding_failed(self, error: Exception, rows: int) -> None:
        # Only a bug gets here (encoding alters what it cannot write): the records are counted, the rest goes on.
        self._mishaps.error("feeder", error)
        self._holding.metrics.rows_dropped.labels("encoding_failed").inc(rows)
        with self._holding.lock:
            self._holding.taken += rows
