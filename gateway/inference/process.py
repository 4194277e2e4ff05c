"""One writer process as the gateway sees it: the spawned process, its end of the pipe, and the thread reading it.

Or, under a supervisor that shares one writer process among its workers, a worker's connection to it: the same
protocol over a unix socket, where ending the handle closes the connection and leaves the process running.

A fresh interpreter (`python -c`), not multiprocessing's spawn: that would re-run the gateway's `__main__` module
in the child, and a script without a `__name__` guard would start a gateway there. It runs in a session of its
own, so a terminal's Ctrl-C or a signal to the gateway's process group never reaches it: the gateway ends it.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from gateway.inference.wire import framed_head

log = logging.getLogger(__name__)

WATCH_S = 1.0
REAP_S = 10.0
CONNECT_S = 5.0
PEER_CREDENTIALS = struct.Struct("3i")
ENTRY = "import sys; from gateway.inference.child import main; main(int(sys.argv[1]))"
# Linux takes at most this many buffers in one writev.
MAX_IOV = 1024


def write_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """Every piece, in order, in as few system calls as the pipe allows: each call gives the interpreter's lock away
    and takes it back, which costs the event loop's thread a switch whenever it holds it meanwhile."""
    start = 0
    while start < len(pieces):
        batch = pieces[start:start + MAX_IOV]
        sent = os.writev(fd, batch)
        for piece in batch:
            if sent < len(piece):
                pieces[start] = memoryview(piece)[sent:]
                break
            sent -= len(piece)
            start += 1


class WriterProcess:
    def __init__(
        self,
        process: subprocess.Popen[bytes] | None,
        conn: Connection,
        pid: int,
        on_message: Callable[[WriterProcess, tuple[Any, ...]], None],
        on_exit: Callable[[WriterProcess], None],
        is_hung: Callable[[], bool],
        on_error: Callable[[Exception], None],
    ) -> None:
        self._process = process
        self._conn = conn
        self._pid = pid
        self._on_message = on_message
        self._on_exit = on_exit
        self._is_hung = is_hung
        self._on_error = on_error
        self._send_lock = threading.Lock()
        self._receiver = threading.Thread(target=self._receive_loop, name="lockgate-inference-receiver", daemon=True)

    @classmethod
    def start(
        cls,
        options: Any,
        on_message: Callable[[WriterProcess, tuple[Any, ...]], None],
        on_exit: Callable[[WriterProcess], None],
        is_hung: Callable[[], bool],
        on_error: Callable[[Exception], None],
    ) -> WriterProcess:
        parent_end, child_end = socket.socketpair()
        # The child imports what this process can: the gateway, and whatever `options` pickles by reference.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", ENTRY, str(child_end.fileno())], pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        finally:
            # Only the child may hold its end: when this process ends, the child reads EOF and exits.
            child_end.close()
        conn = Connection(parent_end.detach())
        conn.send_bytes(pickle.dumps(options))
        handle = cls(process, conn, process.pid, on_message, on_exit, is_hung, on_error)
        handle._receiver.start()
        return handle

    @classmethod
    def connect(
        cls,
        address: str,
        on_message: Callable[[WriterProcess, tuple[Any, ...]], None],
        on_exit: Callable[[WriterProcess], None],
        is_hung: Callable[[], bool],
        on_error: Callable[[Exception], None],
    ) -> WriterProcess:
        """A connection to the shared writer process listening at `address`; OSError when it cannot be reached.

        What it answers is unpickled here, so the listener must be this user's (the kernel names its uid).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_S)
            sock.connect(address)
            pid, uid, _gid = PEER_CREDENTIALS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
            if uid != os.geteuid():
                raise PermissionError(f"{address} is served by uid {uid}, not this user")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        handle = cls(None, Connection(sock.detach()), pid, on_message, on_exit, is_hung, on_error)
        handle._receiver.start()
        return handle

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def ending(self) -> str:
        """How it ended, for the log."""
        return "its connection closed" if self._process is None else f"exit code {self.exitcode}"

    def send(self, messages: list[bytes]) -> None:
        """Messages sent back to back, none of another thread's between them; blocks while the pipe is full."""
        pieces: list[bytes | memoryview] = []
        for message in messages:
            pieces += framed_head(len(message)), message
        with self._send_lock:
            write_all(self._conn.fileno(), pieces)

    def kill(self) -> None:
        """Ends the process; a shared one is only let go: the connection closes, and so do the threads using it."""
        if self._process is None:
            try:
                with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif self._process.poll() is None:
            self._process.kill()

    def stop(self, timeout: float) -> None:
        """Wait for the process to exit (or close a shared one's connection) after its goodbye, killing it past
        timeout, and for its last messages."""
        if self._process is None:
            self._receiver.join(timeout)
            if self._receiver.is_alive():
                self.kill()
        else:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._receiver.join(timeout + REAP_S)

    def _deliver(self, data: bytes) -> None:
        """One message to the writer; whatever goes wrong with it, this thread goes on reading the next."""
        try:
            self._on_message(self, pickle.loads(data))
        except Exception as error:
            self._on_error(error)

    def _receive_loop(self) -> None:
        try:
            while True:
                if self._conn.poll(WATCH_S):
                    self._deliver(self._conn.recv_bytes())
                elif self._is_hung():
                    log.error("inference writer process %s stopped answering; killing it", self.pid)
                    self.kill()
        except (EOFError, OSError):
            pass
        if self._process is not None:
            try:
                self._process.wait(REAP_S)
            except subprocess.TimeoutExpired:
                self.kill()
                self._process.wait()
        with self._send_lock:
            self._conn.close()
        try:
            self._on_exit(self)
        except Exception as error:
            self._on_error(error)
