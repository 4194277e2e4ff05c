"""A folder of batch files that could not reach ClickHouse, replayed oldest first.

A file written now starts with the line `lockgate spool 2`, then holds its frames each after its length (uint64,
little-endian): a frame may carry payloads as they are, newlines included. Files without that line (format 1, as
earlier versions wrote them) hold one JSON frame, or one record, per line; both are read and replayed alike.

The gateway's process writes the files; the writer process replays and removes them and reports what it removed,
so the counters here (the gateway's metrics) stay right without reading the folder again. Workers that share one
writer process share its folder too: each counts the files it wrote (their names carry its pid), and the writer
process, the only one that replays, reports each replay to the worker that wrote the file, and at each listing
what the folder holds of each worker's (so one that missed replays while it was not connected is set right).
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.inference.wire import FRAME_ROWS, decode_frames, encode_frame

SUFFIX = ".jsonl"
PARTIAL_SUFFIX = ".tmp"
# A partial file this old is no write in progress (one takes milliseconds), whoever's pid its name carries.
ORPHAN_AGE_S = 60.0
FORMAT_2 = b"lockgate spool 2\n"
_FRAME_LENGTH = struct.Struct("<Q")


class Spool:
    """Each batch is one file written whole (temp file + rename), so a crash never leaves half a batch behind.

    A file holds its frames (module docstring); its name carries its row count (`<ns>-<pid>-<seq>-<rows>r.jsonl`).
    The owner (the gateway's process) counts the files at start and removes partial ones a crash left behind;
    the writer process opens the same folder to replay it. A `shared` owner (one worker of several) counts only
    the files it writes.
    """

    def __init__(self, directory: str | os.PathLike[str], *, owner: bool = True, shared: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rejected_directory = self.directory / "rejected"
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._bytes = 0
        self._rows = 0
        self.orphans_removed = 0
        if owner:
            self.orphans_removed = self._remove_orphans()
            for path in [] if shared else self.files():
                self._bytes += path.stat().st_size
                self._rows += rows_in(path)

    def _remove_orphans(self) -> int:
        """Delete partial files (never complete batches: those are renamed) that no running writer is writing."""
        removed = 0
        now = time.time()
        for entry in os.scandir(self.directory):
            if not (entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file()):
                continue
            try:
                if _writer_alive(entry.name) and now - entry.stat().st_mtime < ORPHAN_AGE_S:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def rows(self) -> int:
        return self._rows

    def files(self) -> list[Path]:
        """Spooled batches, oldest first (names start with a zero-padded nanosecond clock): one listing."""
        names = [entry.name for entry in os.scandir(self.directory)
                 if entry.name.endswith(SUFFIX) and not entry.name.startswith(".")]
        return [self.directory / name for name in sorted(names)]

    def write(self, records: Sequence[dict[str, Any]]) -> Path:
        frames = [encode_frame(records[start:start + FRAME_ROWS]) for start in range(0, len(records), FRAME_ROWS)]
        return self.write_frames(frames, len(records))

    def write_frames(self, frames: Sequence[bytes], rows: int) -> Path:
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}-{rows}r{SUFFIX}"
        final = self.directory / name
        partial = self.directory / f".{name}{PARTIAL_SUFFIX}"
        with open(partial, "wb") as handle:
            handle.write(FORMAT_2)
            for frame in frames:
                handle.write(_FRAME_LENGTH.pack(len(frame)))
                handle.write(frame)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(partial, final)
        # The rename is durable only once the folder's entry is on disk too.
        sync_folder(self.directory)
        with self._lock:
            self._bytes += size
            self._rows += rows
        return final

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The file's records; ValueError for a damaged file."""
        data = path.read_bytes()
        if data.startswith(FORMAT_2):
            return decode_frames(_frames(data))
        return decode_frames(data.splitlines())

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

    def recount(self, rows: int, size: int) -> None:
        """This writer's files as the shared writer process found them in the folder."""
        with self._lock:
            self._rows, self._bytes = rows, size

    def forget(self, rows: int, size: int) -> None:
        # Never below zero: a file of an earlier process that had this pid is not one this process counted.
        with self._lock:
            self._bytes = max(self._bytes - size, 0)
            self._rows = max(self._rows - rows, 0)


def _frames(data: bytes) -> list[bytes]:
    frames = []
    position = len(FORMAT_2)
    while position < len(data):
        if position + _FRAME_LENGTH.size > len(data):
            raise ValueError("a spool file cut short in a frame's length")
        (size,) = _FRAME_LENGTH.unpack_from(data, position)
        position += _FRAME_LENGTH.size
        if position + size > len(data):
            raise ValueError("a spool file cut short in a frame")
        frames.append(data[position:position + size])
        position += size
    return frames


def rows_in(path: Path) -> int:
    """The row count in the file name; files without one (the oldest) hold one record per line."""
    last = path.name.removesuffix(SUFFIX).rsplit("-", 1)[-1]
    if last.endswith("r") and last[:-1].isdigit():
        return int(last[:-1])
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


def sync_folder(folder: Path) -> None:
    """Makes a rename or a new name in `folder` survive a crash of the machine."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _writer_alive(partial_name: str) -> bool:
    """Whether the process whose pid the partial file's name carries (`.<ns>-<pid>-...`) still runs."""
    fields = partial_name[1:].split("-")
    if len(fields) < 2 or not fields[1].isdigit():
        return False
    try:
        os.kill(int(fields[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
