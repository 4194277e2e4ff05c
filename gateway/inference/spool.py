"""A folder of batch files that could not reach ClickHouse, replayed oldest first.

The gateway's process writes the files; the writer process replays and removes them and reports what it removed,
so the counters here (the gateway's metrics) stay right without reading the folder again.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.inference.wire import FRAME_ROWS, decode_frames, encode_frame

SUFFIX = ".jsonl"


class Spool:
    """Each batch is one file written whole (temp file + rename), so a crash never leaves half a batch behind.

    A file holds one frame per line; its name carries its row count (`<ns>-<pid>-<seq>-<rows>r.jsonl`).
    """

    def __init__(self, directory: str | os.PathLike[str], *, count: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rejected_directory = self.directory / "rejected"
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._bytes = 0
        self._rows = 0
        if count:
            for path in self.files():
                self._bytes += path.stat().st_size
                self._rows += rows_in(path)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def rows(self) -> int:
        return self._rows

    def files(self) -> list[Path]:
        """Spooled batches, oldest first (names start with a zero-padded nanosecond clock)."""
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def write(self, records: Sequence[dict[str, Any]]) -> Path:
        frames = [encode_frame(records[start:start + FRAME_ROWS]) for start in range(0, len(records), FRAME_ROWS)]
        return self.write_frames(frames, len(records))

    def write_frames(self, frames: Sequence[bytes], rows: int) -> Path:
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}-{rows}r{SUFFIX}"
        final = self.directory / name
        partial = self.directory / f".{name}.tmp"
        with open(partial, "wb") as handle:
            for frame in frames:
                handle.write(frame)
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(partial, final)
        with self._lock:
            self._bytes += size
            self._rows += rows
        return final

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return decode_frames(path.read_bytes().splitlines())

    def remove(self, path: Path) -> tuple[int, int]:
        """Delete a replayed batch; returns its (rows, bytes)."""
        rows, size = rows_in(path), path.stat().st_size
        path.unlink()
        self.forget(rows, size)
        return rows, size

    def reject(self, path: Path) -> tuple[int, int]:
        """Set a batch aside (kept for inspection, never replayed); returns its (rows, bytes)."""
        rows, size = rows_in(path), path.stat().st_size
        self.rejected_directory.mkdir(exist_ok=True)
        os.replace(path, self.rejected_directory / path.name)
        self.forget(rows, size)
        return rows, size

    def forget(self, rows: int, size: int) -> None:
        with self._lock:
            self._bytes -= size
            self._rows -= rows


def rows_in(path: Path) -> int:
    """The row count in the file name; files without one (older ones) hold one record per line."""
    last = path.name.removesuffix(SUFFIX).rsplit("-", 1)[-1]
    if last.endswith("r") and last[:-1].isdigit():
        return int(last[:-1])
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())
