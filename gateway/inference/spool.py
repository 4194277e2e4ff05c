"""A folder of batch files that could not reach ClickHouse, replayed oldest first."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

SUFFIX = ".jsonl"


class Spool:
    """Each batch is one file written whole (temp file + rename), so a crash never leaves half a batch behind."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rejected_directory = self.directory / "rejected"
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._bytes = 0
        self._rows = 0
        for path in self.files():
            self._bytes += path.stat().st_size
            self._rows += _count_lines(path)

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
        data = b"".join(orjson.dumps(record) + b"\n" for record in records)
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}{SUFFIX}"
        final = self.directory / name
        partial = self.directory / f".{name}.tmp"
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, final)
        with self._lock:
            self._bytes += len(data)
            self._rows += len(records)
        return final

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]

    def remove(self, path: Path, rows: int) -> None:
        size = path.stat().st_size
        path.unlink()
        self._forget(size, rows)

    def reject(self, path: Path) -> int:
        """Set a batch aside (kept for inspection, never replayed); returns its row count."""
        rows = _count_lines(path)
        size = path.stat().st_size
        self.rejected_directory.mkdir(exist_ok=True)
        os.replace(path, self.rejected_directory / path.name)
        self._forget(size, rows)
        return rows

    def _forget(self, size: int, rows: int) -> None:
        with self._lock:
            self._bytes -= size
            self._rows -= rows


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line)
