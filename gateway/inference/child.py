"""The writer process: owns the ClickHouse client (and so the chdb engine), inserts batches, replays the spool.

It talks to the gateway's process over one pipe. In: batches (a header, then their frames), flush and query
requests, and a goodbye. Out: small tuples (acks, connection state, spool removals, results). It exits when the
pipe closes, so it never outlives the gateway. Everything it does can take as long as ClickHouse takes: the
gateway's event loop never waits on it.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.inference.rows import COLUMNS, batch_token, safe_row
from gateway.inference.spool import Spool
from gateway.inference.store import DEDUP_SETTINGS, connect, migrate
from gateway.inference.wire import decode_frames

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

BATCH, FLUSH, QUERY, GOODBYE = b"B", b"F", b"Q", b"X"
BATCH_HEADER = struct.Struct("<QI")
REQUEST_ID = struct.Struct("<Q")
MIN_RETRY_S = 0.5
NICENESS = 10
MAX_RETRY_S = 30.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
UNTYPABLE = "untypable"
# What chdb and clickhouse-connect import when installed and do without otherwise: Arrow results, DataFrame and
# array inserts. Rows here are lists and results tuples, so in this process they would only cost ~75 MB resident.
UNUSED_OPTIONAL_PACKAGES = ("numpy", "pandas", "polars", "pyarrow")


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


def main(fd: int) -> None:
    """The process's entry point: `fd` is its end of the socket pair; the first message is its ChildOptions."""
    # Ctrl-C and systemd signal every process of the group or unit at once: were this one to end first, the last
    # rows would miss ClickHouse. The gateway decides when it ends (a goodbye, a kill past the deadline, or EOF).
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Background work: when CPUs are short, the gateway's event loop gets them first and this catches up later.
    os.nice(NICENESS)
    # A None entry makes `import numpy` raise ImportError, the answer those libraries expect when it is absent.
    for name in UNUSED_OPTIONAL_PACKAGES:
        sys.modules.setdefault(name, None)
    conn = Connection(fd)
    try:
        options = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    ChildWriter(conn, options).serve()


class ChildWriter:
    def __init__(self, conn: Connection, options: ChildOptions) -> None:
        # The gateway's process imports this module for its protocol alone: the driver loads here, in the writer.
        from clickhouse_connect.driver.exceptions import DataError

        self.conn = conn
        self.options = options
        # Errors that say the batch itself cannot be encoded: replaying it would fail forever and block the spool.
        self.poison_errors = (DataError, TypeError, ValueError, OverflowError)
        self.spool = Spool(options.spool_dir, owner=False)
        self.client: Client | None = None
        self.retry_at = 0.0
        self.retry_s = MIN_RETRY_S
        self.flush_ids: list[int] = []
        # Spool files still to replay, from one listing: the folder is listed again only once these are done.
        self.to_replay: deque[Path] = deque()
        self.stuck: set[Path] = set()
        self.errors_seen: set[str] = set()

    def serve(self) -> None:
        try:
            while self.step():
                pass
        except (EOFError, OSError):
            return
        finally:
            if self.client is not None:
                self.client.close()

    def step(self) -> bool:
        """One message handled or one spool file replayed; False after the goodbye. Survives any bug but the pipe's."""
        try:
            self.ensure_client()
            replaying = self.client is not None and self.has_spool_files()
            if not replaying:
                self.answer_flushes()
            if self.conn.poll(0.0 if replaying else self.options.idle_s):
                return self.handle(self.conn.recv_bytes())
            if replaying:
                self.replay_oldest()
        except (EOFError, OSError):
            raise
        except Exception as error:
            kind = type(error).__name__
            if kind not in self.errors_seen:
                self.errors_seen.add(kind)
                log.exception("inference writer process: unexpected %s; carrying on (logged once per kind)", kind)
            self.conn.send(("error", kind))
        return True

    def has_spool_files(self) -> bool:
        if not self.to_replay:
            self.to_replay.extend(path for path in self.spool.files() if path not in self.stuck)
        return bool(self.to_replay)

    def handle(self, message: bytes) -> bool:
        kind = message[:1]
        if kind == BATCH:
            batch_id, frame_count = BATCH_HEADER.unpack_from(message, 1)
            frames = [self.conn.recv_bytes() for _ in range(frame_count)]
            self.conn.send(("ack", batch_id, self.insert_batch(frames)))
        elif kind == FLUSH:
            self.flush_ids.append(REQUEST_ID.unpack_from(message, 1)[0])
            self.retry_now()
        elif kind == QUERY:
            (query_id,) = REQUEST_ID.unpack_from(message, 1)
            self.conn.send(("result", query_id, *self.query(message[1 + REQUEST_ID.size:].decode())))
        return kind != GOODBYE

    def insert_batch(self, frames: list[bytes]) -> str:
        """"written", "failed" (ClickHouse refused it), or "skipped" (no ClickHouse now): the gateway spools the last two."""
        if self.client is None:
            return "skipped"
        try:
            self.insert(decode_frames(frames))
            return "written"
        except self.poison_errors:
            log.exception("inference batch could not be encoded; the gateway spools it")
        except Exception as error:
            self.lost_connection(error)
        return "failed"

    def insert(self, records: list[dict[str, Any]]) -> None:
        assert self.client is not None
        options = self.options
        rows = []
        untypable: list[str] = []
        for record in records:
            row, typed = safe_row(record, log_payloads=options.log_payloads, max_payload_bytes=options.max_payload_bytes)
            rows.append(row)
            if not typed:
                untypable.append(row[0])
        settings = {**DEDUP_SETTINGS, "insert_deduplication_token": batch_token(records)}
        self.client.insert(f"{options.database}.inference", rows, column_names=COLUMNS, settings=settings)
        if untypable:
            self.conn.send(("unencodable", UNTYPABLE, len(untypable), untypable[0]))

    def replay_oldest(self) -> None:
        path = self.to_replay.popleft()
        try:
            records = self.spool.read(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            self.settle(path, "unreadable_spool")
            return
        try:
            self.insert(records)
        except self.poison_errors:
            log.exception("spooled batch %s cannot be encoded; moved to %s", path, self.spool.rejected_directory)
            self.settle(path, "rejected")
            return
        except Exception as error:
            self.to_replay.appendleft(path)
            self.lost_connection(error)
            return
        self.settle(path, None)

    def settle(self, path: Path, rejected_because: str | None) -> None:
        """Remove a replayed file (or set a rejected one aside) and tell the gateway; one that stays is never retried."""
        try:
            rows, size = self.spool.remove(path) if rejected_because is None else self.spool.reject(path)
        except OSError:
            log.exception("spool file %s cannot be removed; it is replayed again at the next start", path)
            self.stuck.add(path)
            return
        if rejected_because is None:
            self.conn.send(("replayed", rows, size))
        else:
            self.conn.send(("rejected", rows, size, rejected_because))

    def answer_flushes(self) -> None:
        """A flush is answered once the spool is empty or ClickHouse is away; batches before it are acked already."""
        for flush_id in self.flush_ids:
            self.conn.send(("flushed", flush_id))
        self.flush_ids.clear()

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
            migrate(client, options.database, options.payload_ttl_days)
        except Exception as error:
            self.retry_at = time.monotonic() + self.retry_s
            self.retry_s = min(self.retry_s * 2, MAX_RETRY_S)
            log.warning("ClickHouse %s unavailable (%s); spooling to %s", safe_dsn(options.dsn), error,
                        Path(options.spool_dir))
            return
        self.client = client
        self.retry_s = MIN_RETRY_S
        self.conn.send(("state", True))

    def lost_connection(self, error: Exception) -> None:
        log.warning("insert into ClickHouse %s failed (%s); spooling and reconnecting", safe_dsn(self.options.dsn),
                    error)
        client, self.client = self.client, None
        if client is not None:
            client.close()
        self.retry_at = time.monotonic() + self.retry_s
        self.retry_s = min(self.retry_s * 2, MAX_RETRY_S)
        self.conn.send(("state", False))


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    scheme, sep, rest = dsn.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.partition(':')[0]}{at}{host}" if at else dsn
