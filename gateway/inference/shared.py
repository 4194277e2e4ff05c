"""One inference writer process for all of a supervisor's workers, so that N workers can write to one chdb folder.

chdb lets one process open a data folder. The supervisor starts the writer process (child.py) before its workers,
with a unix socket to listen on; each worker's InferenceWriter connects there (the address is in the environment
variable LOCKGATE_INFERENCE_SOCKET) and hands its batches over as it would to a writer process of its own: acked
per batch, spooled when the process refuses them, is gone, or hangs. Here the process is kept alive (restarted
with backoff, the exit cause logged) and, once the workers are gone, told to replay their spool and stop.

The socket lies in a folder only this user can enter (mode 0700, made by mkdtemp): that alone keeps other users
out; on top, each side asks the kernel who the other is (SO_PEERCRED) and talks only to this user's processes.
A server DSN (http/https) needs none of this: every worker writes to the server through a writer of its own.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.inference.child import FLUSH, GOODBYE, REQUEST_ID, ChildOptions
from gateway.inference.process import WriterProcess
from gateway.inference.spool import Spool, rows_in
from gateway.inference.store import is_embedded

if TYPE_CHECKING:
    from policies.schema import InferenceTableConfig

log = logging.getLogger("gateway.inference.writer")

SOCKET_ENV = "LOCKGATE_INFERENCE_SOCKET"
SOCKET_NAME = "writer.sock"
# The process listens within a second or two; past this the workers start anyway and spool until it does.
LISTEN_S = 60.0
MIN_RESTART_S = 0.5
MAX_RESTART_S = 30.0
# A process that ran this long before it died was not crashing in a loop: the next one starts at once.
STEADY_S = 60.0
GOODBYE_GRACE_S = 1.0
FLUSH_ID = 1


class SharedWriter:
    """The supervisor's handle on the shared writer process: `start()` before the workers, `close()` after them."""

    def __init__(self, options: ChildOptions, folder: Path) -> None:
        self.address = str(folder / SOCKET_NAME)
        self._folder = folder
        self._options = replace(options, listen=self.address)
        # Guards the process handle and the restart schedule.
        self._lock = threading.Lock()
        self._process: WriterProcess | None = None
        self._started_at = 0.0
        self._restart_at = 0.0
        self._restart_s = MIN_RESTART_S
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._settled = threading.Event()
        self._flushed = threading.Event()
        self._connected = False
        self.restarts = 0
        self._keeper = threading.Thread(target=self._keep_alive, name="lockgate-inference-shared", daemon=True)

    @staticmethod
    def wanted(config: InferenceTableConfig) -> bool:
        """Whether workers need the shared writer: only the embedded engine cannot be opened by each of them."""
        return config.enabled and is_embedded(config.clickhouse)

    @classmethod
    def start(cls, config: InferenceTableConfig) -> SharedWriter:
        """Starts the writer process and waits (bounded) until it listens, so the first workers need not spool."""
        # As the owner of the spool: partial files a crash left behind go; complete ones wait for the replay.
        spool = Spool(config.spool_dir)
        options = ChildOptions(config.clickhouse, config.database, config.log_payloads, config.max_payload_bytes,
                               config.payload_ttl_days, str(config.spool_dir), config.flush_interval_ms / 1000.0)
        writer = cls(options, Path(tempfile.mkdtemp(prefix="lockgate-inference-")))
        if spool.rows:
            log.info("%d rows in the inference spool %s: the shared writer replays them", spool.rows, spool.directory)
        writer._spawn()
        writer._keeper.start()
        if not writer._settled.wait(LISTEN_S):
            log.warning("the shared inference writer does not listen on %s yet; workers spool until it does",
                        writer.address)
        return writer

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def connected(self) -> bool:
        """Whether the writer process holds a working ClickHouse connection, as it last reported."""
        return self._connected

    def close(self, timeout: float) -> bool:
        """After every worker has exited: replay what they spooled (as time allows), then end the process.

        True when the spool is empty and the process ended in order; rows left in the spool are named in the log
        and written at the next start.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        self._keeper.join(timeout)
        with self._lock:
            process = self._process
        clean = False
        if process is not None:
            self._flushed.clear()
            try:
                process.send([FLUSH + REQUEST_ID.pack(FLUSH_ID)])
                flushed = self._flushed.wait(max(deadline - time.monotonic(), 0.0))
                process.send([GOODBYE])
            except (OSError, ValueError):
                flushed = False
            process.stop(max(deadline - time.monotonic(), GOODBYE_GRACE_S))
            clean = flushed and process.exitcode == 0
        shutil.rmtree(self._folder, ignore_errors=True)
        left = sum(rows_in(path) for path in Spool(self._options.spool_dir, owner=False).files())
        if left:
            log.warning("shared inference writer stopped with %d rows in the spool %s, not yet in ClickHouse: the "
                        "next start writes them", left, self._options.spool_dir)
        return clean and not left

    def _keep_alive(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                waiting = self._process is None
                due = self._restart_at - time.monotonic()
            if waiting and due <= 0:
                self._spawn()
                continue
            self._wake.wait(due if waiting else None)
            self._wake.clear()

    def _spawn(self) -> None:
        # Under the lock: a process that dies at once is reported (by its receiver thread) only once it is recorded.
        with self._lock:
            try:
                self._process = WriterProcess.start(self._options, self._on_message, self._on_exit, lambda: False,
                                                    self._on_error)
            except OSError as error:
                log.error("cannot start the shared inference writer process (%s); workers spool to %s, retrying in "
                          "%.1f s", error, self._options.spool_dir, self._restart_s)
                self._schedule_restart()
                return
            self._started_at = time.monotonic()

    def _schedule_restart(self) -> float:
        """When the next process starts, backing off while they keep dying; the caller holds the lock."""
        now = time.monotonic()
        if self._started_at and now - self._started_at >= STEADY_S:
            self._restart_s = MIN_RESTART_S
        delay = self._restart_s
        self._restart_at = now + delay
        self._restart_s = min(self._restart_s * 2, MAX_RESTART_S)
        return delay

    def _on_message(self, _process: WriterProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "listening":
            self._settled.set()
        elif kind == "state":
            self._connected = message[1]
        elif kind == "flushed" and message[1] == FLUSH_ID:
            self._flushed.set()

    def _on_exit(self, process: WriterProcess) -> None:
        with self._lock:
            if self._process is process:
                self._process = None
            self._connected = False
            delay = self._schedule_restart()
        self._settled.set()
        self._flushed.set()
        if not self._stopping.is_set():
            self.restarts += 1
            log.warning("shared inference writer process %s %s; workers spool meanwhile, restarting in %.1f s",
                        process.pid, exit_cause(process.exitcode), delay)
        self._wake.set()

    def _on_error(self, error: Exception) -> None:
        log.error("shared inference writer: unexpected %s reading the writer process", type(error).__name__,
                  exc_info=error)


def exit_cause(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
