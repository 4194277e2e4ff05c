"""`lockgate batch run`: a batch file through the whole pipeline in this process (no listener), results to a file.

Everything the command is given is checked before anything runs or OUT is touched: the key, the route, every input
line. Results are appended to OUT as they finish, flushed at once (a killed process loses none of them) and synced to
disk every second; rerunning the same command skips the custom_ids OUT already holds. The run's batch id (the
`batch_id` of its inference rows) is kept next to OUT (results.jsonl: results.jsonl.lockgate), written before the
first line runs, so a resumed run's rows carry the first run's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import orjson
import uvloop
from aiohttp import web

from gateway.batch.job import CANCEL_GRACE_S, Line, LineError, LineResult, Slots, parse_line, run_job
from gateway.batch.store import BATCH_ID, new_batch_id, write_atomically
from policies.keys import KeyRing, Principal
from policies.loader import PolicyError, load_policy
from policies.schema import BatchConfig, Policy

EXIT_USAGE = 2
EXIT_UNFINISHED = 1
EXIT_INTERRUPTED = 130
# OpenAI's only completion window: a line held back by a rate limit keeps waiting for up to this long.
COMPLETION_WINDOW_S = 24 * 3600.0
SYNC_EVERY_S = 1.0
TTY_REDRAW_S = 0.2
PLAIN_EVERY_S = 5.0
BAR_WIDTH = 24

if TYPE_CHECKING:
    from gateway.context import Gateway


class BatchRunError(Exception):
    """Something the command was given is wrong; the message says what, and nothing was run or written."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    input: Path
    route: str
    out: Path
    policy: Path
    key: str | None
    concurrency: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    """What the checks found: how many lines, those OUT already answers, and who runs them."""

    total: int
    done: set[str]
    principal: Principal | None  # None: a JWT, verified once the app has fetched the provider's keys
    batch_id: str
    # False: the id is new, and the sidecar is written before the first line runs.
    batch_id_kept: bool


def run(options: RunOptions) -> int:
    """The whole command: its exit code."""
    logging.basicConfig(level=os.environ.get("LOCKGATE_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy, key = _policy_and_key(options)
        plan = _plan(options, policy, key)
    except BatchRunError as exc:
        print(f"lockgate batch run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lockgate batch run: interrupted before any line ran", file=sys.stderr)
        return EXIT_INTERRUPTED
    if len(plan.done) == plan.total:
        print(f"all {plan.total} lines already have a result in {options.out}", file=sys.stderr)
        return 0
    try:
        return uvloop.run(_run(options, key, plan))
    except KeyboardInterrupt:
        # While the app starts or stops: the lines have their own Ctrl-C handler while they run.
        print(f"lockgate batch run: interrupted; run the same command again to finish {options.out}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _policy_and_key(options: RunOptions) -> tuple[Policy, str]:
    key = options.key or os.environ.get("LOCKGATE_API_KEY", "")
    if not key:
        raise BatchRunError("no API key: set LOCKGATE_API_KEY or pass --key")
    try:
        policy = load_policy(options.policy).policy
    except PolicyError as exc:
        raise BatchRunError(exc.format()) from None
    if options.route not in policy.routes:
        known = ", ".join(sorted(policy.routes)) or "none"
        raise BatchRunError(f"unknown route {options.route!r}: the policy's routes are {known}")
    return policy, key


def _is_jwt(key: str, policy: Policy) -> bool:
    return policy.auth.jwt is not None and key.startswith("eyJ") and key.count(".") == 2


def _plan(options: RunOptions, policy: Policy, key: str) -> Plan:
    principal = None
    if not _is_jwt(key, policy):
        principal = KeyRing(policy).authenticate(key)
        if principal is None:
            raise BatchRunError("the API key is not one of the policy's keys (from --key or LOCKGATE_API_KEY)")
    ids = _check_input(options.input, policy.batch)
    if not ids:
        raise BatchRunError(f"{options.input}: no lines to run")
    if not options.out.parent.is_dir():
        raise BatchRunError(f"{options.out}: the folder {options.out.parent} does not exist")
    done = _read_done(options.out) & ids
    kept = _kept_batch_id(options.out)
    return Plan(len(ids), done, principal, kept or new_batch_id(), kept is not None)


def sidecar(out: Path) -> Path:
    """Where the run's batch id is kept: next to OUT, named after it."""
    return out.with_name(f"{out.name}.lockgate")


def _kept_batch_id(out: Path) -> str | None:
    """The batch id of the run that began OUT; None for a new OUT (an id left by a deleted OUT is not reused) or
    a sidecar that is missing or not one this command wrote."""
    if not out.exists():
        return None
    try:
        kept = orjson.loads(sidecar(out).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    batch_id = kept.get("batch_id") if isinstance(kept, dict) else None
    return batch_id if isinstance(batch_id, str) and BATCH_ID.fullmatch(batch_id) else None


def _raw_lines(path: Path, limits: BatchConfig) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line, each read with a bound so an endless line costs no memory."""
    with path.open("rb") as file:
        number = 0
        while raw := file.readline(limits.max_line_bytes + 1):
            number += 1
            if len(raw) > limits.max_line_bytes and not raw.endswith(b"\n"):
                raise BatchRunError(f"{path}:{number}: the line is longer than the limit of {limits.max_line_bytes} bytes")
            if raw.strip():
                yield number, raw


def _check_input(path: Path, limits: BatchConfig) -> set[str]:
    """Every line parsed once (none kept, only its custom_id), so a bad file is refused before any line runs."""
    try:
        if path.is_dir():
            raise BatchRunError(f"{path}: a folder, not a batch file")
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise BatchRunError(f"{path}: {size} bytes, more than the limit of {limits.max_file_bytes}")
        ids: set[str] = set()
        for number, raw in _raw_lines(path, limits):
            line = _parse(raw, number, path)
            if line.custom_id in ids:
                raise BatchRunError(f"{path}:{number}: custom_id {line.custom_id!r} appears more than once")
            ids.add(line.custom_id)
            if len(ids) > limits.max_lines:
                raise BatchRunError(f"{path}: more than the limit of {limits.max_lines} lines")
    except OSError as exc:
        raise BatchRunError(f"cannot read {path}: {exc.strerror or exc}") from None
    return ids


def _parse(raw: bytes, number: int, path: Path) -> Line:
    try:
        return parse_line(raw, number, None)
    except LineError as exc:
        where = f" ({exc.param})" if exc.param else ""
        raise BatchRunError(f"{path}:{number}: {exc.message}{where} [{exc.code}]") from None


def _read_done(out: Path) -> set[str]:
    """The custom_ids OUT already holds. A torn last line (a process killed mid-write: no newline) is cut away; a
    whole line that is not a result means OUT is not this command's file, and it is left alone."""
    try:
        data = out.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise BatchRunError(f"cannot read {out}: {exc.strerror or exc}") from None
    *whole, torn = data.split(b"\n")
    done: set[str] = set()
    for number, raw in enumerate(whole, 1):
        if not raw:
            continue
        custom_id = _custom_id(raw)
        if custom_id is None:
            raise BatchRunError(f"{out}:{number}: not a result line; is OUT the output of another command?")
        done.add(custom_id)
    if torn:
        with out.open("r+b") as file:
            file.truncate(len(data) - len(torn))
            os.fsync(file.fileno())
    return done


def _custom_id(raw: bytes) -> str | None:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = parsed.get("custom_id") if isinstance(parsed, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _lines(options: RunOptions, limits: BatchConfig) -> Iterator[Line]:
    """The second, lazy pass: run_job holds only the lines in flight. Read on the loop: a line is at most
    max_line_bytes from a local file, and this process serves nothing else."""
    for number, raw in _raw_lines(options.input, limits):
        line = _parse(raw, number, options.input)
        yield Line(line.custom_id, line.url, {**line.body, "model": options.route})


@dataclass(slots=True)
class Progress:
    total: int
    resumed: int
    tty: bool
    done: int = 0
    failed: int = 0
    cost_micro_usd: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: LineResult) -> None:
        self.done += 1
        self.failed += result.failed
        self.cost_micro_usd += result.cost_micro_usd

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        finished = self.resumed + self.done
        rate = self.rate()
        left = self.total - finished
        eta = _duration(left / rate) if rate > 0 else "-"
        text = (f"{finished}/{self.total} done, {self.failed} failed, {rate:.1f} lines/s, ETA {eta}, "
                f"cost ${self.cost_micro_usd / 1e6:.4f}")
        if not self.tty:
            return text
        filled = BAR_WIDTH * finished // self.total
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"

    async def show(self) -> None:
        every = TTY_REDRAW_S if self.tty else PLAIN_EVERY_S
        while True:
            await asyncio.sleep(every)
            self.draw()

    def draw(self) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{self.line()}")
        else:
            sys.stderr.write(f"{self.line()}\n")
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ResultFile:
    """OUT opened for appending: each result flushed as it comes, synced to disk at most once a second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] = path.open("ab")
        self.synced = time.monotonic()

    def write(self, result: LineResult) -> None:
        self.file.write(result.to_line())
        self.file.flush()
        if time.monotonic() - self.synced >= SYNC_EVERY_S:
            os.fsync(self.file.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


async def _run(options: RunOptions, key: str, plan: Plan) -> int:
    loop = asyncio.get_running_loop()
    running = asyncio.current_task()
    assert running is not None
    interrupted = False

    def interrupt_start() -> None:
        # The start is interrupted as the lines are, through the loop's own handler (the lines install theirs):
        # with only asyncio's, a Ctrl-C while the start awaited the identity provider's keys was twice not seen in
        # the test suite.
        nonlocal interrupted
        interrupted = True
        running.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt_start)
    try:
        return await _start_and_run(options, key, plan)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _start_and_run(options: RunOptions, key: str, plan: Plan) -> int:
    from gateway.api.signin import SIGN_IN
    from gateway.app import create_app
    from gateway.context import GATEWAY
    from gateway.errors import GatewayError

    app = create_app(options.policy, run_batches=False)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    gateway = app[GATEWAY]
    try:
        principal = plan.principal
        if principal is None:
            try:
                principal = await app[SIGN_IN].authenticate(key, gateway.policy)
            except GatewayError as exc:
                print(f"lockgate batch run: the API key was refused: {exc.message}", file=sys.stderr)
                return EXIT_USAGE
        return await _run_lines(options, plan, principal, gateway)
    finally:
        gateway.stop_deadline = time.monotonic() + gateway.policy.loaded.policy.server.shutdown_timeout_s
        await runner.cleanup()


async def _run_lines(options: RunOptions, plan: Plan, principal: Principal, gateway: Gateway) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    progress = Progress(plan.total, len(plan.done), sys.stderr.isatty())
    results = ResultFile(options.out)

    def interrupt() -> None:
        if stop.is_set():
            # A second Ctrl-C ends the process at once: every result emitted so far is already flushed to OUT.
            os._exit(EXIT_INTERRUPTED)
        stop.set()
        sys.stderr.write(f"\nstopping: lines in flight get up to {CANCEL_GRACE_S:.0f} s (Ctrl-C again to quit now)\n")

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    write_failures: list[OSError] = []

    def emit(result: LineResult) -> None:
        try:
            results.write(result)
        except OSError as exc:
            # A full disk, say: the line has no result, and the run stops rather than answer lines nobody keeps.
            write_failures.append(exc)
            stop.set()
            return
        progress.add(result)

    shown = loop.create_task(progress.show())
    try:
        if not plan.batch_id_kept:
            try:
                write_atomically(sidecar(options.out), orjson.dumps({"batch_id": plan.batch_id}))
            except OSError as exc:
                write_failures.append(exc)
                stop.set()
        await run_job(gateway, principal, _lines(options, gateway.policy.loaded.policy.batch), plan.done,
                      slots=Slots(override=options.concurrency), batch_id=plan.batch_id,
                      expires_at=time.time() + COMPLETION_WINDOW_S, cancelled=stop.is_set, emit=emit)
    finally:
        shown.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shown
        with contextlib.suppress(OSError):
            results.close()
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    if write_failures:
        print(f"lockgate batch run: cannot write {options.out}: {write_failures[0]}", file=sys.stderr)
    return _summary(options, progress, interrupted=stop.is_set() and not write_failures)


def _summary(options: RunOptions, progress: Progress, interrupted: bool) -> int:
    if progress.tty:
        progress.draw()
        sys.stderr.write("\n")
    finished = progress.resumed + progress.done
    elapsed = time.monotonic() - progress.started
    print(f"{finished} of {progress.total} lines have a result in {options.out} ({progress.failed} of the "
          f"{progress.done} run now failed); {progress.done} in {elapsed:.2f} s ({progress.rate():.1f} lines/s), "
          f"cost ${progress.cost_micro_usd / 1e6:.4f}", file=sys.stderr)
    if finished == progress.total:
        return 0
    if interrupted:
        print(f"interrupted: run the same command again to finish the other {progress.total - finished} lines",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{progress.total - finished} lines have no result; run the same command again to retry them",
          file=sys.stderr)
    return EXIT_UNFINISHED
