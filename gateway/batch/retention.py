"""Retention: uploaded files and finished batches (with their result files) older than `batch.retention_days` are
deleted by the runner's poll, a bounded amount of work per sweep. A batch not yet finished and its input file are
never deleted, whatever their age.

Ages come from the ids (UUIDv7: the first 48 bits are the creation time in milliseconds), so finding what is old
reads no record: the names are listed oldest first and the sweep stops at the first one young enough.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.batch.store import TERMINAL, BatchStore

log = logging.getLogger("lockgate.batch")

DAY_S = 86400
# Bounds of one sweep, whatever the folder holds; what is left waits for the next.
MAX_DELETED_PER_SWEEP = 200
MAX_READ_PER_SWEEP = 1000
_FINISHED_FIELDS = ("completed_at", "failed_at", "expired_at", "cancelled_at")


def created_at(record_id: str) -> float:
    """When a file or batch was created, from its id (`file-<hex>`, `batch_<hex>`)."""
    return int(record_id[-32:-20], 16) / 1000


def expires_at(file: dict, retention_days: int) -> int:
    return int(file["created_at"]) + retention_days * DAY_S


def _ended_at(batch: dict) -> float:
    """When a finished batch ended; a record edited out of shape reads as never ending, so it is kept."""
    times = [batch.get(name) for name in _FINISHED_FIELDS]
    ended = [value for value in times if type(value) is int]
    return max(ended) if ended else float("inf")


@dataclass(slots=True)
class Swept:
    batches: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def sweep(store: BatchStore, retention_days: int, now: float, finished: Iterable[str],
          inputs: dict[str, str]) -> Swept:
    """One bounded sweep. `finished`: batches the runner saw end; `inputs`: the input file of each batch it saw not
    yet finished. Batches it has not seen yet are read here, so a new batch's input is kept too; when there are more
    than one sweep may read, no file is deleted this time."""
    cutoff = now - retention_days * DAY_S
    finished = set(finished)
    swept = Swept()
    reads = 0
    kept_inputs = set(inputs.values())
    batch_ids = store.batch_ids()
    for batch_id in batch_ids:
        if batch_id in finished or batch_id in inputs:
            continue
        reads += 1
        if reads > MAX_READ_PER_SWEEP:
            break
        record = store.read_batch(batch_id)
        if record is not None and record["batch"].get("status") not in TERMINAL:
            kept_inputs.add(str(record["batch"].get("input_file_id")))
    inputs_known = reads <= MAX_READ_PER_SWEEP
    for batch_id in reversed(batch_ids):
        if created_at(batch_id) >= cutoff or len(swept.batches) >= MAX_DELETED_PER_SWEEP or reads >= MAX_READ_PER_SWEEP:
            break
        if batch_id not in finished:
            continue
        reads += 1
        record = store.read_batch(batch_id)
        if record is None or record["batch"].get("status") not in TERMINAL:
            continue
        batch = record["batch"]
        if _ended_at(batch) < cutoff:
            for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
                if isinstance(file_id, str) and store.delete_file(file_id):
                    swept.files.append(file_id)
            store.delete_batch(batch_id)
            swept.batches.append(batch_id)
    if inputs_known:
        for file_id in store.file_ids():
            if created_at(file_id) >= cutoff or len(swept.files) >= MAX_DELETED_PER_SWEEP:
                break
            if file_id not in kept_inputs and store.delete_file(file_id):
                swept.files.append(file_id)
    if swept.batches or swept.files:
        log.info("retention (%d days): deleted %d batches and %d files", retention_days, len(swept.batches),
                 len(swept.files))
    return swept
