"""The writer process: owns the ClickHouse client (and so the chdb engine), inserts batches, replays the spool.

It talks to its owner over one socket: the gateway's process that started it or, when the supervisor shares one
writer among its workers, the supervisor; then the workers connect to a unix socket it listens on (`listen`),
each a peer of its own speaking the same protocol. In: batches (a header, then their frames), flush and query
requests, and a goodbye. Out: small tuples (acks, connection state, spool removals, results). It exits when the
owner's socket closes, so it never outlives the owner. Everything it does can take as long as ClickHouse takes:
no gateway's event loop waits on it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.inference.rows import COLUMNS, batch_token, to_columns
from gateway.inference.spool import Spool, rows_in
from gateway.inference.store import DEDUP_SETTINGS, connect, is_embedded, migrate
from gateway.inference.wire import MessageReader, decode_frames, framed

if TYPE_CHECKING:
    from clickhouse_connect.datatypes.base import ClickHouseType
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

BATCH, FLUSH, QUERY, GOODBYE = b"B", b"F", b"Q", b"X"
BATCH_HEADER = struct.Struct("<QI")
REQUEST_ID = struct.Struct("<Q")
PEER_CREDENTIALS = struct.Struct("3i")
MIN_RETRY_S = 0.5
NICENESS = 10
MAX_RETRY_S = 30.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
UNTYPABLE = "untypable"
# What chdb and clickhouse-connect import when installed and do without otherwise: Arrow results, DataFrame and
# array inserts. Rows here are lists and results tuples, so in this process they would only cost ~75 MB resident.
UNUSED_OPTIONAL_PACKAGES = ("numpy", "pandas", "polars", "pyarrow")
READ_BYTES = 1 << 20
# One frame is 64 records; a message past this is a broken stream, never a batch.
MAX_MESSAGE_BYTES = 1 << 30
MAX_PEERS = 256
# A worker that does not read its acks this long is stuck: it is let go, and spools what it had sent.
PEER_SEND_S = 30.0


@dataclass(frozen=True)
class ChildOptions:
    dsn: str
    database: str
    log_payloads: bool
    max_payload_bytes: int
    payload_ttl_days: int
    spool_dir: str
    idle_s: float
    connect_client: Callable[[], Client] | None = field(default=None)
    # The unix socket the supervisor's workers connect to; None when the owner is the only peer.
    listen: str | None = None


@contextlib.contextmanager
def uncollected() -> Iterator[None]:
    """No cyclic collection while a batch is decoded, typed and inserted.

    A batch is ~50 objects a row, all acyclic and freed by their reference counts once it is written; with the
    collector on, the young collections it triggers walk them again and again, ~20% of this process's Python time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class OwnerGone(Exception):
    """The owner's socket closed or failed: the process ends."""


class Peer:
    """One connection: the owner's, or a worker's; `pid` (a worker's, from the kernel) names its spool files."""

    def __init__(self, sock: socket.socket, pid: int | None = None) -> None:
        self.sock = sock
        self.pid = pid
        self.reader = MessageReader(MAX_MESSAGE_BYTES)
        self.batch: tuple[int, int, list[bytes]] | None = None
        # Its spooled rows and bytes as last reported; None: never reported, so the first listing is.
        self.reported: tuple[int, int] | None = None

    @property
    def is_owner(self) -> bool:
        return self.pid is None

    def send(self, message: tuple[Any, ...]) -> None:
        self.sock.sendall(framed(pickle.dumps(message)))

    def read(self) -> list[bytes] | None:
        """The messages completed by what is readable now; None once the peer is gone or its stream is broken."""
        try:
            data = self.sock.recv(READ_BYTES)
            return self.reader.feed(data) if data else None
        except (OSError, ValueError):
            return None


def main(fd: int) -> None:
    """The process's entry point: `fd` is its end of the owner's socket; the first message is its ChildOptions."""
    # Ctrl-C and systemd signal every process of the group or unit at once: were this one to end first, the last
    # rows would miss ClickHouse. The owner decides when it ends (a goodbye, a kill past the deadline, or EOF).
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Background work: when CPUs are short, the gateway's event loop gets them first and this catches up later.
    os.nice(NICENESS)
    # A None entry makes `import numpy` raise ImportError, the answer those libraries expect when it is absent.
    for name in UNUSED_OPTIONAL_PACKAGES:
        sys.modules.setdefault(name, None)
    owner = Peer(socket.socket(fileno=fd))
    messages: list[bytes] | None = []
    while messages == []:
        messages = owner.read()
    if not messages:
        return
    ChildWriter(owner, pickle.loads(messages[0])).serve(messages[1:])


class ChildWriter:
    def __init__(self, owner: Peer, options: ChildOptions) -> None:
        # The gateway's process imports this module for its protocol alone: the driver loads here, in the writer.
        from clickhouse_connect.driver.exceptions import DataError

        self.owner = owner
        self.options = options
        self.peers: list[Peer] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(owner.sock, selectors.EVENT_READ, owner)
        self.listener: socket.socket | None = None
        # Errors that say the batch itself cannot be encoded: replaying it would fail forever and block the spool.
        self.poison_errors = (DataError, TypeError, ValueError, OverflowError)
        self.spool = Spool(options.spool_dir, owner=False)
        self.client: Client | None = None
        # Read once a connection: without them, clickhouse-connect asks the table for them at every insert (~8 ms).
        self.column_types: Sequence[ClickHouseType] | None = None
        self.retry_at = 0.0
        self.retry_s = MIN_RETRY_S
        self.flush_ids: list[tuple[Peer, int]] = []
        # Spool files still to replay, from one listing: the folder is listed again only once these are done.
        self.to_replay: deque[Path] = deque()
        self.stuck: set[Path] = set()
        self.errors_seen: set[str] = set()

    def serve(self, first: list[bytes]) -> None:
        try:
            self.listen()
            # Before the first batch: one sent with the options finds ClickHouse as a later one would.
            self.ensure_client()
            # What the imports and the engine built lives as long as the process: later collections skip it.
            gc.freeze()
            if self.deliver(self.owner, first):
                while self.step():
                    pass
        except OwnerGone:
            return
        finally:
            for peer in list(self.peers):
                self.drop(peer)
            if self.listener is not None:
                self.listener.close()
            if self.client is not None:
                self.client.close()

    def listen(self) -> None:
        """Workers' socket, in a folder only this user can enter (the supervisor made it); a dead writer's is replaced."""
        path = self.options.listen
        if path is None:
            return
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(MAX_PEERS)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.tell(self.owner, ("listening",))

    def step(self) -> bool:
        """Every message waiting handled, and one spool file replayed; False after the owner's goodbye.

        Survives any bug but the owner's socket's.
        """
        try:
            self.ensure_client()
            replaying = self.client is not None and self.has_spool_files()
            if not replaying:
                self.answer_flushes()
            for key, _ in self.selector.select(0.0 if replaying else self.options.idle_s):
                if key.data is None:
                    self.accept()
                elif not self.deliver(key.data, key.data.read()):
                    return False
            if replaying:
                self.replay_oldest()
        except OwnerGone:
            raise
        except Exception as error:
            self.survive(error)
        return True

    def survive(self, error: Exception) -> None:
        kind = type(error).__name__
        if kind not in self.errors_seen:
            self.errors_seen.add(kind)
            log.exception("inference writer process: unexpected %s; carrying on (logged once per kind)", kind)
        self.tell(self.owner, ("error", kind))

    def accept(self) -> None:
        """New workers; a peer the kernel says runs as another user is refused, whatever the folder lets through."""
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            pid, uid, _gid = PEER_CREDENTIALS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
            if uid != os.geteuid() or len(self.peers) >= MAX_PEERS:
                if "refused peer" not in self.errors_seen:
                    self.errors_seen.add("refused peer")
                    log.warning("inference writer: refused a connection from pid %d (uid %d): only this user's "
                                "workers may write, at most %d (logged once)", pid, uid, MAX_PEERS)
                sock.close()
                continue
            sock.settimeout(PEER_SEND_S)
            peer = Peer(sock, pid)
            self.peers.append(peer)
            self.selector.register(sock, selectors.EVENT_READ, peer)
            if self.client is not None:
                self.tell(peer, ("state", True))

    def drop(self, peer: Peer) -> None:
        """A worker gone (its batches in flight are spooled on its side), or let go after its goodbye."""
        if peer not in self.peers:
            return
        self.peers.remove(peer)
        self.selector.unregister(peer.sock)
        peer.sock.close()
        self.flush_ids = [(waiting, flush_id) for waiting, flush_id in self.flush_ids if waiting is not peer]

    def tell(self, peer: Peer, message: tuple[Any, ...]) -> None:
        try:
            peer.send(message)
        except OSError:
            if peer.is_owner:
                raise OwnerGone from None
            self.drop(peer)

    def broadcast(self, message: tuple[Any, ...]) -> None:
        for peer in [self.owner, *self.peers]:
            self.tell(peer, message)

    def deliver(self, peer: Peer, messages: list[bytes] | None) -> bool:
        """Handles what a peer sent, message by message; False once the owner said goodbye."""
        if messages is None:
            if peer.is_owner:
                raise OwnerGone
            self.drop(peer)
            return True
        for message in messages:
            try:
                if not self.handle(peer, message):
                    if peer.is_owner:
                        return False
                    self.drop(peer)
                    return True
            except OwnerGone:
                raise
            except Exception as error:
                self.survive(error)
        return True

    def has_spool_files(self) -> bool:
        if not self.to_replay:
            listed = [path for path in self.spool.files() if path not in self.stuck]
            self.to_replay.extend(listed)
            if self.peers:
                self.report_spools(listed)
        return bool(self.to_replay)

    def report_spools(self, listed: list[Path]) -> None:
        """Each worker's rows and bytes in the folder, when they changed: a worker misses the replays of its files
        while it is not connected, and its own count would stay too high."""
        held: dict[str, tuple[int, int]] = {}
        for path in listed:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            pid = self.pid_of(path)
            rows, total = held.get(pid, (0, 0))
            held[pid] = (rows + rows_in(path), total + size)
        for peer in list(self.peers):
            totals = held.get(str(peer.pid), (0, 0))
            if totals != peer.reported:
                peer.reported = totals
                self.tell(peer, ("spool", *totals))

    def handle(self, peer: Peer, message: bytes) -> bool:
        """One message; False for a goodbye (everything the peer sent before it is answered by then)."""
        if peer.batch is not None:
            peer.batch[2].append(message)
            self.finish_batch(peer)
            return True
        kind = message[:1]
        if kind == BATCH:
            batch_id, frame_count = BATCH_HEADER.unpack_from(message, 1)
            peer.batch = (batch_id, frame_count, [])
            self.finish_batch(peer)
        elif kind == FLUSH:
            self.flush_ids.append((peer, REQUEST_ID.unpack_from(message, 1)[0]))
            self.retry_now()
        elif kind == QUERY:
            (query_id,) = REQUEST_ID.unpack_from(message, 1)
            self.tell(peer, ("result", query_id, *self.query(message[1 + REQUEST_ID.size:].decode())))
        return kind != GOODBYE

    def finish_batch(self, peer: Peer) -> None:
        """Inserts and acks the peer's batch once its last frame is in."""
        assert peer.batch is not None
        batch_id, frame_count, frames = peer.batch
        if len(frames) < frame_count:
            return
        peer.batch = None
        self.tell(peer, ("ack", batch_id, self.insert_batch(frames, peer)))

    def insert_batch(self, frames: list[bytes], peer: Peer) -> str:
        """"written", "failed" (ClickHouse refused it), or "skipped" (no ClickHouse now): the gateway spools the last two."""
        if self.client is None:
            return "skipped"
        try:
            with uncollected():
                self.insert(decode_frames(frames), peer)
            return "written"
        except self.poison_errors:
            log.exception("inference batch could not be encoded; the gateway spools it")
        except Exception as error:
            self.lost_connection(error)
        return "failed"

    def insert(self, records: list[dict[str, Any]], peer: Peer) -> None:
        assert self.client is not None
        options = self.options
        columns, untypable = to_columns(records, log_payloads=options.log_payloads,
                                        max_payload_bytes=options.max_payload_bytes)
        settings = {**DEDUP_SETTINGS, "insert_deduplication_token": batch_token(records)}
        self.client.insert(f"{options.database}.inference", columns, column_names=COLUMNS, column_oriented=True,
                           column_types=self.column_types, settings=settings)
        if untypable:
            self.tell(peer, ("unencodable", UNTYPABLE, len(untypable), untypable[0]))

    def replay_oldest(self) -> None:
        path = self.to_replay.popleft()
        try:
            with uncollected():
                records = self.spool.read(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            self.settle(path, "unreadable_spool")
            return
        try:
            with uncollected():
                self.insert(records, self.writer_of(path))
        except self.poison_errors:
            log.exception("spooled batch %s cannot be encoded; moved to %s", path, self.spool.rejected_directory)
            self.settle(path, "rejected")
            return
        except Exception as error:
            self.to_replay.appendleft(path)
            self.lost_connection(error)
            return
        self.settle(path, None)

    @staticmethod
    def pid_of(path: Path) -> str:
        """The pid of the process that wrote a spool file, from its name (`<ns>-<pid>-<seq>-<rows>r.jsonl`)."""
        fields = path.name.split("-")
        return fields[1] if len(fields) > 1 else ""

    def writer_of(self, path: Path) -> Peer:
        """The connected worker that wrote a spool file (it counts its spool), else the owner."""
        pid = self.pid_of(path)
        return next((peer for peer in self.peers if str(peer.pid) == pid), self.owner)

    def settle(self, path: Path, rejected_because: str | None) -> None:
        """Remove a replayed file (or set a rejected one aside) and tell its writer; one that stays is never retried."""
        try:
            rows, size = self.spool.remove(path) if rejected_because is None else self.spool.reject(path)
        except OSError:
            log.exception("spool file %s cannot be removed; it is replayed again at the next start", path)
            self.stuck.add(path)
            return
        if rejected_because is None:
            self.tell(self.writer_of(path), ("replayed", rows, size))
        else:
            self.tell(self.writer_of(path), ("rejected", rows, size, rejected_because))

    def answer_flushes(self) -> None:
        """A flush is answered once the spool is empty or ClickHouse is away; batches before it are acked already."""
        waiting, self.flush_ids = self.flush_ids, []
        for peer, flush_id in waiting:
            self.tell(peer, ("flushed", flush_id))

    def query(self, sql: str) -> tuple[list[tuple[Any, ...]] | None, str | None]:
        self.retry_now()
        if self.client is None:
            return None, f"ClickHouse {safe_dsn(self.options.dsn)} is unavailable"
        try:
            return [tuple(row) for row in self.client.query(sql).result_rows], None
        except Exception as error:
            return None, str(error)

    def retry_now(self) -> None:
        self.retry_at = 0.0
        self.ensure_client()

    def ensure_client(self) -> None:
        if self.client is not None or time.monotonic() < self.retry_at:
            return
        options = self.options
        try:
            client = options.connect_client() if options.connect_client else connect(options.dsn)
            migrate(client, options.database, options.payload_ttl_days, sole_writer=is_embedded(options.dsn))
            self.column_types = client.create_insert_context(f"{options.database}.inference",
                                                             column_names=COLUMNS).column_types
        except Exception as error:
            self.retry_at = time.monotonic() + self.retry_s
            self.retry_s = min(self.retry_s * 2, MAX_RETRY_S)
            log.warning("ClickHouse %s unavailable (%s); spooling to %s", safe_dsn(options.dsn), error,
                        Path(options.spool_dir))
            return
        self.client = client
        self.retry_s = MIN_RETRY_S
        self.broadcast(("state", True))

    def lost_connection(self, error: Exception) -> None:
        log.warning("insert into ClickHouse %s failed (%s); spooling and reconnecting", safe_dsn(self.options.dsn),
                    error)
        client, self.client = self.client, None
        if client is not None:
            client.close()
        self.retry_at = time.monotonic() + self.retry_s
        self.retry_s = min(self.retry_s * 2, MAX_RETRY_S)
        self.broadcast(("state", False))


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    scheme, sep, rest = dsn.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.partition(':')[0]}{at}{host}" if at else dsn
