"""Records submitted and not yet in a batch: once the feeder runs, each is encoded as it is submitted, and every
64 make a frame of the batch being formed. Records that come while others wait unencoded (before the feeder starts,
or while it encodes a spill) are queued as they come and encoded by the feeder a frame at a time; a queue that
reaches queue_max is set aside whole (spilled) and encoded as whole batches.

`submit` runs on the event loop's thread: encoding one record there costs ~1.5 µs, where handing frames to the
feeder thread cost ~10 µs a record in switches, since both threads need the interpreter's lock for it (the feeder
waited for it while the loop ran, and was woken every time the loop let go of it). Frames wait for their batch as
bytes (~1.1 KB a record instead of ~1.8 KB and six objects the cyclic collector walks), so a large batch_rows costs
the gateway little memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from gateway.inference.holding import Batch, Holding
from gateway.inference.metrics import Mishaps
from gateway.inference.wire import FRAME_ROWS, Piece, encode_frame, frame_of, piece_bytes, record_piece


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
        self._pieces: list[Piece] = []
        self._pieces_bytes = 0
        self._forming: list[bytes] = []
        self._forming_rows = 0
        self.submitted = 0
        # Set once the feeder runs: until then nothing would send what submit encodes, and records wait as they came.
        self.encode_on_submit = False

    @property
    def depth(self) -> int:
        """Records not yet encoded, spilled ones aside."""
        return len(self._queue)

    @property
    def forming_bytes(self) -> int:
        return sum(len(frame) for frame in list(self._forming)) + self._pieces_bytes

    def rows(self) -> int:
        """Every record held here: queued, spilled, or encoded into the forming batch."""
        with self._lock:
            return (len(self._queue) + sum(len(spill) for spill in self._spills) + len(self._pieces)
                    + self._forming_rows)

    def submit(self, record: dict[str, Any]) -> bool:
        """Encodes or queues one record; True when the feeder has a batch to send, or a frame or a spill to encode."""
        with self._lock:
            self.submitted += 1
            if self.encode_on_submit and not self._queue and not self._spills:
                formed = self._encode_one(record)
                depth = 0
            else:
                formed = None
                pending = self._queue
                pending.append(record)
                depth = len(pending)
                if depth >= self._queue_max:
                    self._queue = deque()
                    self._spills.append(pending)
        if formed is not None:
            self._hand_over(formed)
            return True
        return depth > 0 and (depth % self._wake_every == 0 or depth >= self._queue_max)

    def encode(self, drain_all: bool) -> None:
        """Spilled records as whole batches; queued ones a frame at a time into the forming batch, which goes to the
        ready batches once it holds batch_rows (and, when drain_all, with whatever it holds)."""
        while True:
            formed = None
            with self._lock:
                if self._spills:
                    spill = self._spills[0]
                    records = [spill.popleft() for _ in range(min(self._batch_rows, len(spill)))]
                    if not spill:
                        self._spills.popleft()
                else:
                    take = min(FRAME_ROWS, self._batch_rows - self._forming_rows)
                    if len(self._queue) < take and not (drain_all and self._queue):
                        break
                    # Under the lock, so that no record is encoded on submit ahead of these, and the pieces encoded
                    # on submit never meet a forming batch that grew under them.
                    formed = self._encode_queued([self._queue.popleft() for _ in range(min(take, len(self._queue)))])
                    records = []
            if formed is not None:
                self._hand_over(formed)
            if records:
                self._encode_batch(records)
            # Hands the GIL to the event loop between frames, should it be waiting for it.
            time.sleep(0)
        if drain_all:
            with self._lock:
                batches = [self._frame_pieces() if self._pieces else None, self._take_forming() if self._forming else None]
            for batch in batches:
                if batch is not None:
                    self._hand_over(batch)

    def _encode_queued(self, records: list[dict[str, Any]]) -> Batch | None:
        """Under the lock: a frame of queued records into the forming batch; the batch when that completes it."""
        try:
            frame = encode_frame(records, self._mishaps.unencodable)
        except Exception as error:
            self._encoding_failed(error, len(records))
            return None
        return self._add_frame(frame, len(records))

    def _encode_one(self, record: dict[str, Any]) -> Batch | None:
        """Under the lock: the record into the forming batch; the batch when that completes it."""
        try:
            piece = record_piece(record, self._mishaps.unencodable)
        except Exception as error:
            self._encoding_failed(error, 1)
            return None
        self._pieces.append(piece)
        self._pieces_bytes += piece_bytes(piece)
        if len(self._pieces) < min(FRAME_ROWS, self._batch_rows - self._forming_rows):
            return None
        return self._frame_pieces()

    def _frame_pieces(self) -> Batch | None:
        frame = frame_of(self._pieces)
        rows = len(self._pieces)
        self._pieces, self._pieces_bytes = [], 0
        return self._add_frame(frame, rows)

    def _add_frame(self, frame: bytes, rows: int) -> Batch | None:
        """Under the lock: a frame into the forming batch; the batch when that completes it."""
        self._forming.append(frame)
        self._forming_rows += rows
        return self._take_forming() if self._forming_rows >= self._batch_rows else None

    def _take_forming(self) -> Batch:
        batch = Batch(self._forming, self._forming_rows)
        self._forming, self._forming_rows = [], 0
        return batch

    def _hand_over(self, batch: Batch) -> None:
        with self._holding.lock:
            self._holding.ready.append(batch)

    def _encode_batch(self, records: list[dict[str, Any]]) -> None:
        try:
            batch = Batch.encode(records, self._mishaps.unencodable)
        except Exception as error:
            self._encoding_failed(error, len(records))
            return
        self._hand_over(batch)

    def _encoding_failed(self, error: Exception, rows: int) -> None:
        # Only a bug gets here (encoding alters what it cannot write): the records are counted, the rest goes on.
        self._mishaps.error("feeder", error)
        self._holding.metrics.rows_dropped.labels("encoding_failed").inc(rows)
        with self._holding.lock:
            self._holding.taken += rows
