"""The durable folder of the Files and Batch APIs, under the policy's `batch.data_dir`.

    files/<file_id>.json        the File object and its owner; files/<file_id>.data the bytes
    batches/<batch_id>/batch.json   the Batch object and its owner, replaced atomically (tmp, fsync, rename)
                      input.jsonl   a hard link to the input file's bytes (deleting the file does not end the batch)
                      output.jsonl, errors.jsonl   result lines, appended and fsynced by the batch's runner
                      cancel        the marker a cancel leaves, from whichever process answered it
                      lock          flock'ed by the one process that runs the batch; a dead holder's lock is free

A folder, not the ClickHouse tables: an API answer must read what was just written (an insert is seen only after
its flush), the inference table may be a server that is down (its rows are spooled, the API must not be), and the
files are blobs of up to hundreds of megabytes. Every method here blocks: the doors and the runner call them in a
thread.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import orjson

from gateway.batch.usage import UsageSums
from gateway.inference.ids import uuid7
from gateway.inference.spool import sync_folder
from policies.jwt_auth import JWT_KEY_PREFIX
from policies.keys import Principal
from policies.schema import Policy

FILE_ID = re.compile(r"file-[0-9a-f]{32}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The most records one list call reads, whatever the folder holds: a page of records hidden by ownership or purpose
# ends early (has_more set) rather than read on.
MAX_RECORDS_READ = 1000
_TMP = ".tmp"
_BLOCK = 64 * 1024


def new_file_id() -> str:
    return "file-" + uuid7().replace("-", "")


def new_batch_id() -> str:
    return "batch_" + uuid7().replace("-", "")


def owner_of(principal: Principal) -> dict[str, object]:
    return {"key_id": principal.key_id, "user": principal.user, "groups": list(principal.groups)}


def stored_principal(owner: dict) -> Principal:
    return Principal(str(owner["key_id"]), str(owner["user"]), tuple(str(g) for g in owner["groups"]))


def principal_now(owner: dict, policy: Policy) -> Principal | None:
    """The submitter as the current policy knows them: a key's user and groups as they are now (None when the key
    was revoked or its user removed); a signed-in user as they were (there is no token to check again)."""
    key_id = str(owner["key_id"])
    if key_id.startswith(JWT_KEY_PREFIX):
        return stored_principal(owner)
    for entry in policy.keys:
        if entry.id == key_id and entry.user in policy.users:
            return Principal(entry.id, entry.user, tuple(policy.users[entry.user].groups))
    return None


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{_TMP}")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)


def _read_record(path: Path, kind: str) -> dict | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, orjson.JSONDecodeError):
        # Written atomically, so never half-written by the gateway: a damaged one was edited by hand.
        return None
    if not isinstance(data, dict) or not isinstance(data.get(kind), dict) or not isinstance(data.get("owner"), dict):
        return None
    return data


class Claim:
    """The flock on one batch's `lock` file: held while this process runs the batch, gone with the process."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)
            self._handle = -1


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.batches = root / "batches"

    def _folders(self) -> None:
        for folder in (self.files, self.batches, self.files / _TMP):
            folder.mkdir(parents=True, exist_ok=True)

    # Files

    def upload_path(self, file_id: str) -> Path:
        """Where an upload is written while it arrives; commit_file moves it into place."""
        self._folders()
        return self.files / _TMP / f"{file_id}.part"

    def commit_file(self, upload: Path, file: dict, owner: dict) -> None:
        upload_fd = os.open(upload, os.O_RDONLY)
        try:
            os.fsync(upload_fd)
        finally:
            os.close(upload_fd)
        os.replace(upload, self.data_path(file["id"]))
        write_atomically(self.files / f"{file['id']}.json", orjson.dumps({"file": file, "owner": owner}))

    def add_result_file(self, source: Path, file: dict, owner: dict) -> None:
        """A batch's output or error file as a File object sharing the bytes of the batch's own file; repeatable
        (a finalize interrupted by a crash runs again)."""
        self._folders()
        with contextlib.suppress(FileExistsError):
            os.link(source, self.data_path(file["id"]))
        write_atomically(self.files / f"{file['id']}.json", orjson.dumps({"file": file, "owner": owner}))

    def data_path(self, file_id: str) -> Path:
        return self.files / f"{file_id}.data"

    def read_file(self, file_id: str) -> dict | None:
        """{"file": File object, "owner": ...}; None for an unknown (or malformed) id."""
        if not FILE_ID.fullmatch(file_id):
            return None
        return _read_record(self.files / f"{file_id}.json", "file")

    def delete_file(self, file_id: str) -> bool:
        if not FILE_ID.fullmatch(file_id):
            return False
        try:
            (self.files / f"{file_id}.json").unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.data_path(file_id).unlink()
        return True

    def file_ids(self) -> list[str]:
        """Every file's id, oldest first (ids are UUIDv7, time-ordered by name); no record is read."""
        try:
            names = os.listdir(self.files)
        except FileNotFoundError:
            return []
        return sorted(name[:-5] for name in names if name.endswith(".json") and FILE_ID.fullmatch(name[:-5]))

    def drop_stale_uploads(self, older_than_s: float) -> None:
        """Uploads a dead process left half-written."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.files / _TMP):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < time.time() - older_than_s:
                        os.unlink(entry.path)

    # Batches

    def folder(self, batch_id: str) -> Path:
        return self.batches / batch_id

    def create_batch(self, batch: dict, owner: dict, input_file_id: str) -> None:
        self._folders()
        folder = self.folder(batch["id"])
        folder.mkdir()
        os.link(self.data_path(input_file_id), folder / "input.jsonl")
        # batch.json last: a folder without it is not a batch yet, and the runners pass it by.
        self.write_batch(batch["id"], {"batch": batch, "owner": owner})

    def read_batch(self, batch_id: str) -> dict | None:
        """{"batch": Batch object, "owner": ...}; None for an unknown (or malformed) id."""
        if not BATCH_ID.fullmatch(batch_id):
            return None
        return _read_record(self.folder(batch_id) / "batch.json", "batch")

    def write_batch(self, batch_id: str, record: dict) -> None:
        write_atomically(self.folder(batch_id) / "batch.json", orjson.dumps(record))

    def batch_ids(self) -> list[str]:
        """Every batch's id, newest first; no record is read."""
        try:
            names = os.listdir(self.batches)
        except FileNotFoundError:
            return []
        return sorted((name for name in names if BATCH_ID.fullmatch(name)), reverse=True)

    def delete_batch(self, batch_id: str) -> None:
        """A finished batch's folder: its record first, so from then on it reads as missing."""
        folder = self.folder(batch_id)
        with contextlib.suppress(FileNotFoundError):
            (folder / "batch.json").unlink()
        shutil.rmtree(folder, ignore_errors=True)

    def request_cancel(self, batch_id: str) -> float:
        """Leaves the cancel marker (once) and returns when the cancel was first asked."""
        marker = self.folder(batch_id) / "cancel"
        with contextlib.suppress(FileExistsError):
            handle = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(handle)
            sync_folder(marker.parent)
        return marker.stat().st_mtime

    def cancel_requested_at(self, batch_id: str) -> float | None:
        try:
            return (self.folder(batch_id) / "cancel").stat().st_mtime
        except FileNotFoundError:
            return None

    def claim(self, batch_id: str) -> Claim | None:
        """The batch's lock, when no process (this one included) holds it."""
        handle = os.open(self.folder(batch_id) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        return Claim(handle)


def after_cursor(ids: list[str], after: str | None, newest_first: bool) -> list[str]:
    """The ids past `after` in a time-ordered list (an id need not exist to be a cursor: the order is the names')."""
    if after is None:
        return ids
    if newest_first:
        return ids[len(ids) - bisect.bisect_left(ids[::-1], after):]
    return ids[bisect.bisect_right(ids, after):]


def read_page(ids: list[str], read: Callable[[str], dict | None], keep: Callable[[dict], bool],
              limit: int) -> tuple[list[dict], bool]:
    """The first `limit` records of `ids` that `keep` accepts and whether more follow, reading at most
    MAX_RECORDS_READ records."""
    found: list[dict] = []
    for reads, record_id in enumerate(ids):
        if reads == MAX_RECORDS_READ:
            return found, True
        record = read(record_id)
        if record is None or not keep(record):
            continue
        if len(found) == limit:
            return found, True
        found.append(record)
    return found, False


def recorded_ids(path: Path) -> list[str]:
    """The custom_ids of a result file, after cutting a torn last line (a write a crash interrupted) away."""
    return read_results(path)[0]


def read_results(path: Path) -> tuple[list[str], UsageSums]:
    """The custom_ids of a result file and the usage its answers carry, after cutting a torn last line away."""
    ids: list[str] = []
    usage = UsageSums()
    try:
        handle = open(path, "r+b")  # noqa: SIM115 - a missing file is no results, told apart from the work below
    except FileNotFoundError:
        return ids, usage
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                _truncate_torn_line(handle, size)
        handle.seek(0)
        for raw in handle:
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                ids.append(item["custom_id"])
                response = item.get("response")
                if isinstance(response, dict):
                    usage.add_answer(response.get("body"))
    return ids, usage


def _truncate_torn_line(handle: BinaryIO, size: int) -> None:
    """Cuts the file back to just after its last newline, read backwards a block at a time."""
    end = size
    while end > 0:
        start = max(end - _BLOCK, 0)
        handle.seek(start)
        cut = handle.read(end - start).rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    handle.truncate(end)
    handle.flush()
    os.fsync(handle.fileno())
