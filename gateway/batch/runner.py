"""The batch runner: one per gateway process. It polls the store's folder, claims each runnable batch with the flock
of its `lock` file (so of N workers one runs it, and whoever polls next takes over a dead holder's), validates its
input, runs its lines with run_job and keeps its results and counts on disk as they come.

A stop cancels the running lines and lets the locks go: the batches stay `in_progress`, and the next gateway resumes
each where its files end (lines with a result are not run again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.batch.job import Line, LineError, LineResult, Slots, parse_line, run_job
from gateway.batch.retention import sweep
from gateway.batch.store import TERMINAL, BatchStore, Claim, new_file_id, principal_now, read_results
from gateway.batch.usage import UsageSums
from gateway.context import Gateway
from gateway.errors import unauthorized
from gateway.inference.ids import uuid7
from policies.schema import BatchConfig

log = logging.getLogger("lockgate.batch")

# The most errors a failed batch lists: enough to fix a file by, bounded whatever the file holds.
MAX_LISTED_ERRORS = 100
# How often a running batch's results are fsynced, its counts written and its cancel marker looked for.
_SYNC_INTERVAL_S = 0.25
# A batch whose run failed inside the gateway (a full disk, say) is tried again after this long.
_RETRY_AFTER_S = 30.0
_STALE_UPLOAD_S = 3600.0
_SWEEP_EVERY_S = 60.0
_READ_BUFFER = 1024 * 1024


def _input_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based number, line) for every non-blank line; None for a line longer than max_line_bytes (skipped to its
    end, never held whole)."""
    with open(path, "rb", buffering=_READ_BUFFER) as handle:
        number = 0
        while raw := handle.readline(max_line_bytes + 1):
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while (rest := handle.readline(_READ_BUFFER)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
            elif raw.strip():
                yield number, raw


def validate_input(path: Path, endpoint: str, config: BatchConfig) -> tuple[int, list[dict]]:
    """The number of lines of a batch's input, and OpenAI's `errors.data` items when it cannot run."""
    errors: list[dict] = []
    seen: set[str] = set()
    for number, raw in _input_lines(path, config.max_line_bytes):
        if len(seen) + 1 > config.max_lines:
            errors.append(LineError("too_many_requests", f"The file holds more than {config.max_lines} requests.",
                                    number).item())
            break
        if raw is None:
            errors.append(LineError("line_too_long", f"The line is longer than {config.max_line_bytes} bytes.",
                                    number).item())
            continue
        try:
            line = parse_line(raw, number, endpoint)
        except LineError as err:
            errors.append(err.item())
        else:
            if line.custom_id in seen:
                errors.append(LineError("duplicate_custom_id", f"The custom_id '{line.custom_id[:64]}' appears more "
                                        "than once.", number, "custom_id").item())
            seen.add(line.custom_id)
        if len(errors) >= MAX_LISTED_ERRORS:
            break
    if not seen and not errors:
        errors.append(LineError("empty_file", "The input file holds no requests.", 0).item())
    return len(seen), errors


def first_model(path: Path, endpoint: str, max_line_bytes: int) -> str | None:
    """The Batch object's `model`: the route its first line asks for."""
    for line in _parsed_lines(path, endpoint, max_line_bytes):
        model = line.body.get("model")
        return model if isinstance(model, str) else None
    return None


def _parsed_lines(path: Path, endpoint: str, max_line_bytes: int) -> Iterator[Line]:
    """The validated input again, one line at a time: run_job pulls only as many as it has in flight."""
    for number, raw in _input_lines(path, max_line_bytes):
        if raw is not None:
            yield parse_line(raw, number, endpoint)


class _Results:
    """The output and error files of one running batch. A line is written as it finishes (a write survives the
    process being killed, so it is not run again), fsynced with the others of its quarter second."""

    def __init__(self, folder: Path, output: list[str], errors: list[str], usage: UsageSums) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._output = os.open(folder / "output.jsonl", flags, 0o600)
        self._errors = os.open(folder / "errors.jsonl", flags, 0o600)
        self.completed, self.failed = len(output), len(errors)
        # The custom_ids with a result, these files' and the lines emitted since.
        self.recorded = {*output, *errors}
        # Summed as lines finish; a resume starts from what the result files' answers carry, so none counts twice.
        self.usage = usage
        self.changed = False
        self.broken: OSError | None = None

    def emit(self, result: LineResult) -> None:
        if self.broken is not None:
            return
        handle = self._errors if result.failed else self._output
        data = memoryview(result.to_line())
        try:
            while data:
                data = data[os.write(handle, data):]
        except OSError as exc:
            # The batch stops (and is tried again later); the line's result was not kept, so it runs again.
            self.broken = exc
            return
        if result.failed:
            self.failed += 1
        else:
            self.completed += 1
        self.recorded.add(result.custom_id)
        self.usage.add(result.usage)
        self.changed = True

    def sync(self) -> None:
        os.fsync(self._output)
        os.fsync(self._errors)

    def close(self) -> None:
        os.close(self._output)
        os.close(self._errors)


def _refuse_all(lines: Iterator[Line], results: _Results, refusal: dict) -> None:
    for line in lines:
        if line.custom_id not in results.recorded:
            results.emit(LineResult(line.custom_id, uuid7(), 401, refusal, None))


class _BatchRun:
    def __init__(self, runner: BatchRunner, batch_id: str) -> None:
        self.runner = runner
        self.store = runner.store
        self.batch_id = batch_id
        self.folder = self.store.folder(batch_id)
        self.record: dict = {}
        self.cancel_asked_at: float | None = None
        self.revoked = False
        self.stopping = asyncio.Event()

    @property
    def cancel_seen(self) -> bool:
        return self.cancel_asked_at is not None

    @property
    def batch(self) -> dict:
        return self.record["batch"]

    async def save(self, **changes: object) -> None:
        self.batch.update(changes)
        await asyncio.to_thread(self.store.write_batch, self.batch_id, self.record)

    async def run(self) -> None:
        record = await asyncio.to_thread(self.store.read_batch, self.batch_id)
        if record is None or record["batch"]["status"] in TERMINAL:
            return
        self.record = record
        self.cancel_asked_at = await asyncio.to_thread(self.store.cancel_requested_at, self.batch_id)
        config = self.runner.gateway.policy.loaded.policy.batch
        status = self.batch["status"]
        if status == "validating":
            if self.cancel_seen:
                await self.save(status="cancelled", cancelling_at=self.cancelling_at(), cancelled_at=int(time.time()))
                return
            total, errors = await asyncio.to_thread(validate_input, self.folder / "input.jsonl",
                                                    self.batch["endpoint"], config)
            if errors:
                await self.save(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
                return
            model = await asyncio.to_thread(first_model, self.folder / "input.jsonl", self.batch["endpoint"],
                                            config.max_line_bytes)
            await self.save(status="in_progress", in_progress_at=int(time.time()), model=model,
                            request_counts={"total": total, "completed": 0, "failed": 0},
                            usage=UsageSums().to_object())
        if self.batch["status"] != "finalizing":
            await self.run_lines(config)
        await self.finish()

    async def run_lines(self, config: BatchConfig) -> None:
        (output, usage), (errors, error_usage) = await asyncio.gather(
            asyncio.to_thread(read_results, self.folder / "output.jsonl"),
            asyncio.to_thread(read_results, self.folder / "errors.jsonl"))
        usage.merge(error_usage)
        results = await asyncio.to_thread(_Results, self.folder, output, errors, usage)
        syncing = asyncio.get_running_loop().create_task(self.keep_synced(results))
        try:
            if not self.cancel_seen:
                await self.run_job(results, config)
            if results.broken is not None:
                raise results.broken
        finally:
            # Told, not cancelled: a write of batch.json it began must end before the last one starts.
            self.stopping.set()
            try:
                await syncing
                await asyncio.to_thread(results.sync)
                await self.save_counts(results)
            finally:
                await asyncio.to_thread(results.close)

    async def run_job(self, results: _Results, config: BatchConfig) -> None:
        """The lines without a result, as the submitter is now; once their key is revoked (at the start or by a
        reload while the batch runs) the rest fail with a 401."""
        gateway = self.runner.gateway
        path, endpoint = self.folder / "input.jsonl", self.batch["endpoint"]
        principal = principal_now(self.record["owner"], gateway.policy.loaded.policy)
        if principal is not None:
            await run_job(gateway, principal, _parsed_lines(path, endpoint, config.max_line_bytes),
                          set(results.recorded), slots=self.runner.slots, batch_id=self.batch_id,
                          expires_at=float(self.batch["expires_at"]), emit=results.emit,
                          cancelled=lambda: self.cancel_seen or self.revoked or results.broken is not None)
        if principal is None or (self.revoked and not self.cancel_seen and results.broken is None):
            refusal = unauthorized("The API key that created this batch no longer exists.").payload()
            await asyncio.to_thread(_refuse_all, _parsed_lines(path, endpoint, config.max_line_bytes), results,
                                    refusal)

    async def save_counts(self, results: _Results) -> None:
        results.changed = False
        total = self.batch["request_counts"]["total"]
        await self.save(request_counts={"total": total, "completed": results.completed, "failed": results.failed},
                        usage=results.usage.to_object(),
                        **({"status": "cancelling", "cancelling_at": self.cancelling_at()}
                           if self.cancel_seen and self.batch["status"] == "in_progress" else {}))

    def cancelling_at(self) -> int:
        return self.batch["cancelling_at"] or int(self.cancel_asked_at or time.time())

    async def keep_synced(self, results: _Results) -> None:
        policy_version = self.runner.gateway.policy.version
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), _SYNC_INTERVAL_S)
                return
            policy = self.runner.gateway.policy
            if policy.version != policy_version:
                policy_version = policy.version
                self.revoked = principal_now(self.record["owner"], policy.loaded.policy) is None
            if not self.cancel_seen:
                self.cancel_asked_at = await asyncio.to_thread(self.store.cancel_requested_at, self.batch_id)
            if results.changed or (self.cancel_seen and self.batch["status"] == "in_progress"):
                await asyncio.to_thread(results.sync)
                await self.save_counts(results)

    async def finish(self) -> None:
        """The batch's end: its result files become File objects, then its status is final. Each step may be done
        again (a crash in between leaves the batch to be finished by whoever claims it next)."""
        counts = self.batch["request_counts"]
        now = int(time.time())
        if self.cancel_seen:
            final: dict[str, object] = {"status": "cancelled", "cancelled_at": now,
                                        "cancelling_at": self.cancelling_at()}
        elif counts["completed"] + counts["failed"] < counts["total"]:
            raise RuntimeError(f"{counts['total'] - counts['completed'] - counts['failed']} lines have no result")
        elif time.time() >= float(self.batch["expires_at"]):
            final = {"status": "expired", "expired_at": now}
        else:
            final = {"status": "completed", "completed_at": now}
            if self.batch["status"] != "finalizing":
                await self.save(status="finalizing", finalizing_at=now)
        files: dict[str, str | None] = {}
        for name, field in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            files[field] = await asyncio.to_thread(self.result_file, name, field)
        await self.save(**files, **final)

    def result_file(self, name: str, field: str) -> str | None:
        """The File object of one result file (None when it is empty); its id is kept in batch.json before the File
        object is written, so a finish done twice makes one file."""
        source = self.folder / name
        size = source.stat().st_size if source.exists() else 0
        if not size:
            return None
        file_id = self.record.setdefault("result_files", {}).get(field)
        if file_id is None:
            file_id = new_file_id()
            self.record["result_files"][field] = file_id
            self.store.write_batch(self.batch_id, self.record)
        file = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": f"{self.batch_id}_{name.replace('.jsonl', '')}.jsonl", "purpose": "batch_output",
                "status": "processed", "status_details": None, "expires_at": None}
        self.store.add_result_file(source, file, self.record["owner"])
        return file_id


class BatchRunner:
    def __init__(self, gateway: Gateway, store: BatchStore) -> None:
        self.gateway = gateway
        self.store = store
        self.slots = Slots()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        # The input file of every batch seen not yet finished (by whichever process runs it): retention keeps them.
        self._inputs: dict[str, str] = {}
        self._swept_at = float("-inf")
        self._retry_at: dict[str, float] = {}
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        """Stops polling and every running batch; each stays `in_progress`, its lock released, for the next start."""
        tasks = [task for task in (self._poller, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self) -> None:
        await asyncio.to_thread(self.store.drop_stale_uploads, _STALE_UPLOAD_S)
        while True:
            try:
                claimed = await asyncio.to_thread(self._claim_runnable, frozenset(self._running))
            except Exception:
                log.exception("the batch folder %s cannot be read", self.store.root)
                claimed = []
            for batch_id, claim in claimed:
                task = asyncio.get_running_loop().create_task(self._run(batch_id, claim))
                self._running[batch_id] = task
                task.add_done_callback(lambda _, done=batch_id: self._running.pop(done, None))
            if time.monotonic() - self._swept_at >= _SWEEP_EVERY_S:
                self._swept_at = time.monotonic()
                await self._sweep()
            await asyncio.sleep(self.gateway.policy.loaded.policy.batch.poll_interval_s)

    async def _sweep(self) -> None:
        days = self.gateway.policy.loaded.policy.batch.retention_days
        try:
            swept = await asyncio.to_thread(sweep, self.store, days, time.time(), frozenset(self._finished),
                                            dict(self._inputs))
        except Exception:
            log.exception("the retention sweep of %s failed; it is tried again in %.0f s", self.store.root,
                          _SWEEP_EVERY_S)
            return
        self._finished.difference_update(swept.batches)

    def _claim_runnable(self, running: frozenset[str]) -> list[tuple[str, Claim]]:
        claimed: list[tuple[str, Claim]] = []
        now = time.monotonic()
        for batch_id in self.store.batch_ids():
            if batch_id in running or batch_id in self._finished or self._retry_at.get(batch_id, 0.0) > now:
                continue
            record = self.store.read_batch(batch_id)
            if record is None:
                continue
            if record["batch"].get("status") in TERMINAL:
                self._finish(batch_id)
                continue
            input_file_id = record["batch"].get("input_file_id")
            if isinstance(input_file_id, str):
                self._inputs[batch_id] = input_file_id
            claim = self.store.claim(batch_id)
            if claim is not None:
                claimed.append((batch_id, claim))
        return claimed

    def _finish(self, batch_id: str) -> None:
        self._finished.add(batch_id)
        self._inputs.pop(batch_id, None)

    async def _run(self, batch_id: str, claim: Claim) -> None:
        try:
            await _BatchRun(self, batch_id).run()
            self._finish(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped on an error; it is tried again in %.0f s", batch_id, _RETRY_AFTER_S)
            self._retry_at[batch_id] = time.monotonic() + _RETRY_AFTER_S
        finally:
            claim.release()

