"""The supervisor of `--workers N`: starts the workers, restarts the ones that die, forwards signals, stops them all.

Workers share the port through SO_REUSEPORT (gateway.server is their side). The supervisor imports neither aiohttp
nor prometheus_client before it has set PROMETHEUS_MULTIPROC_DIR, so its own figures and every worker's land in
one folder that any worker's /metrics reads whole.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.inference.shared import SharedWriter
    from policies.schema import InferenceTableConfig

log = logging.getLogger("lockgate.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "lockgate-metrics-"
SERVING = b"serving"
# A worker that exits before it has served this long failed to start; that many failed starts in a row in one slot
# mean it cannot be kept alive (a port taken, a broken install, an engine that cannot load), and the supervisor gives up.
STABLE_AFTER_S = 10.0
MAX_FAILED_STARTS = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Beyond the workers' own stop deadline: the time a worker that met its deadline takes to exit its interpreter.
EXIT_GRACE_S = 2.0
# How often the supervisor's gauges sampled from functions are written when nothing else wakes it.
TICK_S = 1.0


@dataclass(frozen=True)
class ServeOptions:
    policy_path: str
    host: str
    port: int
    workers: int
    shutdown_timeout_s: float


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOCKGATE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [%(name)s pid={os.getpid()}] %(message)s",
        stream=sys.stderr,
    )
    # Presidio reports every recognizer of other languages it skips, at each start: noise, not news.
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)


def exit_cause(exitcode: int | None) -> str:
    """What ended a process, in the words an operator greps for: `SIGKILL`, `exit code 1`."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
        return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def backoff_s(failed_starts: int) -> float:
    """The wait before the next start of a slot whose last `failed_starts` starts in a row failed."""
    if failed_starts == 0:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (failed_starts - 1), BACKOFF_MAX_S)


def fresh_metrics_dir() -> tuple[Path, bool]:
    """The folder every process writes its metric files to, emptied; and whether the supervisor made it (and removes
    it at exit). An operator's PROMETHEUS_MULTIPROC_DIR is used, its *.db files deleted (they are a previous run's);
    otherwise a new folder in /dev/shm (memory, no disk writes), or the temp folder."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink(missing_ok=True)
        return folder, False
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    _remove_orphaned_metrics_dirs(parent)
    return Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-", dir=parent)), True


def _remove_orphaned_metrics_dirs(parent: Path) -> None:
    """A supervisor killed with SIGKILL leaves its folder behind, in memory when in /dev/shm: its name carries the
    supervisor's pid, and the next start removes the folders whose supervisor no longer runs."""
    for folder in parent.glob(f"{METRICS_DIR_PREFIX}*-*"):
        owner = folder.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue


def _worker_main(options: ServeOptions, channel: Connection) -> None:
    """A worker process's start; the supervisor itself never imports the gateway (aiohttp, the policy, Presidio)."""
    from gateway.server import run_worker

    run_worker(options, True, channel)


@dataclass
class Slot:
    index: int
    process: BaseProcess | None = None
    channel: Connection | None = None  # the supervisor's end of the worker's socket pair
    serving_since: float | None = None
    failed_starts: int = 0
    start_at: float | None = None  # when the next start is due; None: running, or not to be started again
    reload_when_serving: bool = False


@dataclass
class Supervisor:
    options: ServeOptions
    metrics_dir: Path
    shared_writer: SharedWriter | None = None  # the chdb writer every worker hands its records to
    slots: list[Slot] = field(default_factory=list)
    stopping: bool = False
    gave_up: bool = False
    deadline: float = 0.0

    def __post_init__(self) -> None:
        # Imported once the multiprocess folder is in the environment: prometheus_client picks its value store then.
        from prometheus_client import Counter, Gauge
        from prometheus_client.multiprocess import mark_process_dead

        from gateway import metrics

        self._mark_process_dead = mark_process_dead
        self._sample_gauges = metrics.sample_gauges
        self._alive = Gauge("lockgate_workers_alive", "Worker processes running", multiprocess_mode="mostrecent")
        self._serving = Gauge("lockgate_workers_serving", "Workers accepting requests", multiprocess_mode="mostrecent")
        self._restarts = Counter("lockgate_worker_restarts", "Workers that ended unexpectedly and were started "
                                 "again, by what ended them (SIGKILL, exit code 1...)", ["cause"])
        self._context = multiprocessing.get_context("spawn")
        self.slots = [Slot(index) for index in range(self.options.workers)]

    def _start(self, slot: Slot) -> None:
        mine, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(self.options, theirs),
                                        name=f"lockgate-worker-{slot.index}")
        process.start()
        theirs.close()
        slot.process, slot.channel, slot.serving_since, slot.start_at = process, mine, None, None
        log.debug("worker %d started (pid %s)", slot.index, process.pid)

    def _signal_workers(self, signum: int, serving_only: bool = False) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or process.pid is None or process.exitcode is not None:
                continue
            if serving_only and slot.serving_since is None:
                slot.reload_when_serving = True
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    def _begin_stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.deadline = time.monotonic() + self.options.shutdown_timeout_s + EXIT_GRACE_S
            log.info("%s: stopping %d workers (deadline %.0f s)", reason, self.live_workers(),
                     self.options.shutdown_timeout_s + EXIT_GRACE_S)
        for slot in self.slots:
            slot.start_at = None
        self._signal_workers(signal.SIGTERM)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if not self.stopping:
                log.info("SIGHUP: workers reload the policy")
                self._signal_workers(signal.SIGHUP, serving_only=True)
            return
        self._begin_stop(signal.Signals(signum).name)

    def live_workers(self) -> int:
        return sum(1 for slot in self.slots if slot.process is not None and slot.process.exitcode is None)

    def _on_message(self, slot: Slot) -> None:
        channel = slot.channel
        assert channel is not None
        try:
            message = channel.recv_bytes(64)
        except (EOFError, OSError):
            channel.close()
            slot.channel = None
            return
        if message == SERVING and slot.serving_since is None:
            slot.serving_since = time.monotonic()
            log.debug("worker %d (pid %s) serving", slot.index, slot.process.pid if slot.process else None)
            if slot.reload_when_serving and not self.stopping:
                slot.reload_when_serving = False
                self._signal_workers(signal.SIGHUP, serving_only=True)

    def _on_exit(self, slot: Slot) -> None:
        process = slot.process
        assert process is not None and process.pid is not None
        process.join()
        self._mark_process_dead(process.pid, str(self.metrics_dir))
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        cause = exit_cause(process.exitcode)
        slot.process = None
        if self.stopping:
            log.log(logging.INFO if process.exitcode == 0 else logging.WARNING,
                    "worker %d (pid %d) stopped: %s", slot.index, process.pid, cause)
            return
        served_s = None if slot.serving_since is None else time.monotonic() - slot.serving_since
        slot.failed_starts = 0 if served_s is not None and served_s >= STABLE_AFTER_S else slot.failed_starts + 1
        self._restarts.labels(cause).inc()
        if slot.failed_starts >= MAX_FAILED_STARTS:
            log.error("worker %d (pid %d) exited (%s) %d times in a row before serving %.0f s: giving up", slot.index,
                      process.pid, cause, slot.failed_starts, STABLE_AFTER_S)
            self.gave_up = True
            self._begin_stop("cannot keep workers alive")
            return
        wait_s = backoff_s(slot.failed_starts)
        when = "before serving" if served_s is None else f"after serving {served_s:.1f} s"
        log.error("worker %d (pid %d) exited %s: %s; starting it again in %.1f s", slot.index, process.pid, when, cause,
                  wait_s)
        slot.start_at = time.monotonic() + wait_s

    def _update_gauges(self) -> None:
        self._alive.set(self.live_workers())
        self._serving.set(sum(1 for slot in self.slots if slot.process is not None and slot.serving_since is not None))
        self._sample_gauges()

    def _wait_s(self, now: float) -> float:
        due = [slot.start_at for slot in self.slots if slot.start_at is not None]
        if self.stopping:
            due.append(self.deadline)
        return max(min([*due, now + TICK_S]) - now, 0.0)

    def step(self, wakeup: int) -> None:
        """Waits for one event (a signal, a worker's message or exit, a due restart) and handles what happened."""
        waitables: dict[Any, Slot | None] = {wakeup: None}
        for slot in self.slots:
            if slot.process is not None:
                waitables[slot.process.sentinel] = slot
            if slot.channel is not None:
                waitables[slot.channel] = slot
        ready = wait(list(waitables), self._wait_s(time.monotonic()))
        if wakeup in ready:
            with contextlib.suppress(BlockingIOError):
                for signum in os.read(wakeup, 64):
                    self.on_signal(signum)
        for item in ready:
            slot = waitables[item]
            if slot is not None and item is slot.channel:
                self._on_message(slot)
        for slot in self.slots:
            if slot.process is not None and slot.process.exitcode is not None:
                self._on_exit(slot)
        now = time.monotonic()
        for slot in self.slots:
            if slot.start_at is not None and slot.start_at <= now and not self.stopping:
                self._start(slot)
        self._update_gauges()

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or process.pid is None:
                continue
            if process.exitcode is None:
                log.error("worker %d (pid %d) still running at the stop deadline: killed", slot.index, process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.join()
            self._mark_process_dead(process.pid, str(self.metrics_dir))
            slot.process = None

    def run(self, wakeup: int) -> int:
        for slot in self.slots:
            self._start(slot)
        log.info("started %d workers on port %d", self.options.workers, self.options.port)
        try:
            while not (self.stopping and self.live_workers() == 0):
                if self.stopping and time.monotonic() >= self.deadline:
                    self._kill_stragglers()
                    break
                self.step(wakeup)
            self._update_gauges()
            log.info("all workers stopped")
        finally:
            if self.shared_writer is not None:
                # The workers have handed over (or spooled) their last records: what the deadline leaves is the writer's.
                left_s = self.deadline - time.monotonic() if self.stopping else EXIT_GRACE_S
                self.shared_writer.close(max(left_s, 0.0))
        return 1 if self.gave_up else 0


def start_shared_writer(inference: InferenceTableConfig | None) -> SharedWriter | None:
    """The one writer of the embedded engine's folder, started before any worker, its address in their environment."""
    from gateway.inference.shared import SOCKET_ENV, SharedWriter

    if inference is None or not SharedWriter.wanted(inference):
        return None
    shared = SharedWriter.start(inference)
    os.environ[SOCKET_ENV] = shared.address
    return shared


def supervise(options: ServeOptions, inference: InferenceTableConfig | None = None) -> int:
    """Runs N workers until SIGTERM/SIGINT; 0 after a requested stop, 1 when a worker could not be kept alive."""
    configure_logging()
    metrics_dir, made = fresh_metrics_dir()
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    # Signals are read from a pipe in the main loop, so no handler runs in the middle of the supervisor's own work.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in handled}
    previous_fd = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    try:
        return Supervisor(options, metrics_dir, start_shared_writer(inference)).run(wake_read)
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_read)
        os.close(wake_write)
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(options: ServeOptions, inference: InferenceTableConfig | None = None) -> int:
    """Blocks until SIGTERM/SIGINT: one worker in this process, or N under the supervisor (`inference`: the policy's
    inference table, when enabled: on chdb the supervisor owns its writer)."""
    if options.workers > 1:
        # Its workers are processes of their own: this one, long-lived, collects as usual.
        gc.enable()
        return supervise(options, inference)
    # One process: prometheus_client's in-memory registry costs a request less than the multiprocess files.
    os.environ.pop(MULTIPROC_ENV, None)
    from gateway.server import run_worker

    run_worker(options, reuse_port=False)
    return 0
