"""One writer process for several workers (the supervisor's, on chdb): every record lands once, whoever dies.

Each worker here is a process of its own with an InferenceWriter made by `from_config`, as a gateway worker makes
it, finding the shared writer's socket in LOCKGATE_INFERENCE_SOCKET; the test drives it line by line on stdin.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.inference import connect
from gateway.inference.child import BATCH, BATCH_HEADER
from gateway.inference.shared import SOCKET_ENV, SharedWriter
from gateway.inference.wire import encode_frame, framed
from policies.schema import InferenceTableConfig
from tests.inference.records import make_record
from tests.inference.test_writer_footprint import loaded

REPO = Path(__file__).resolve().parents[2]
WORKER = textwrap.dedent("""
    import json, sys, uuid
    from prometheus_client import CollectorRegistry
    from gateway.inference import InferenceWriter
    from policies.schema import InferenceTableConfig
    from tests.inference.records import make_record

    registry = CollectorRegistry()
    writer = InferenceWriter.from_config(InferenceTableConfig.model_validate_json(sys.argv[1]), registry)
    writer.start()
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "submit":
            answer = [str(uuid.uuid4()) for _ in range(int(argument))]
            for request_id in answer:
                writer.submit(make_record(request_id=request_id))
        elif command == "flush":
            answer = writer.flush(120)
        elif command == "held":
            answer = [writer.queue_depth, writer.queue_bytes]
        elif command == "spooled":
            answer = registry.get_sample_value("lockgate_inference_rows_spooled_total")
        elif command == "spool":
            answer = writer.spool.rows
        elif command == "connected":
            answer = writer.pid
        else:
            answer = writer.close(120)
        print(json.dumps(answer), flush=True)
""")


class Worker:
    """A worker process holding one InferenceWriter; `ask` sends one command and returns its answer."""

    def __init__(self, config: InferenceTableConfig, address: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, config.model_dump_json()], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, SOCKET_ENV: address},
        )

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the worker exited (code {self.process.wait(30)}) before answering {command!r}"
        return json.loads(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def config(chdb_dsn: str, database: str, tmp_path: Path) -> Iterator[InferenceTableConfig]:
    # Batches every 50 ms: records flow while the test acts, not only at the flush.
    yield InferenceTableConfig(enabled=True, clickhouse=chdb_dsn, database=database, spool_dir=str(tmp_path / "spool"),
                               batch_rows=100, flush_interval_ms=50)
    client = connect(chdb_dsn)
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.fixture
def shared(config: InferenceTableConfig) -> Iterator[Callable[[], SharedWriter]]:
    started: list[SharedWriter] = []

    def start() -> SharedWriter:
        writer = SharedWriter.start(config)
        started.append(writer)
        return writer

    yield start
    for writer in started:
        writer.close(30)


@pytest.fixture
def workers(config: InferenceTableConfig) -> Iterator[Callable[[str], Worker]]:
    made: list[Worker] = []

    def make(address: str) -> Worker:
        made.append(Worker(config, address))
        return made[-1]

    yield make
    for worker in made:
        worker.end()


def landed(read_rows: Callable[[str], list[tuple[Any, ...]]], database: str) -> list[str]:
    """Every request id in the raw table, duplicates included (no FINAL): read once the shared writer is closed."""
    return [row[0] for row in read_rows(f"SELECT request_id FROM {database}.inference")]


def test_two_workers_feed_one_writer_and_every_record_lands_once(shared, workers, read_rows, database: str) -> None:
    writer = shared()
    first, second = workers(writer.address), workers(writer.address)
    submitted = [*first.ask("submit 1500"), *second.ask("submit 1500"), *first.ask("submit 700")]
    assert first.ask("flush") and second.ask("flush")
    assert first.ask("connected") == second.ask("connected") == writer.pid
    assert writer.pid is not None and loaded(writer.pid) == {"chdb"}, "the engine, and none of the gateway's stack"
    assert first.ask("close") and second.ask("close")
    assert writer.close(60)

    rows = landed(read_rows, database)
    assert len(rows) == len(submitted) == 3_700
    assert set(rows) == set(submitted)
    assert writer.restarts == 0


def test_a_killed_writer_process_is_restarted_and_its_unacked_batches_land_once(shared, workers, read_rows,
                                                                                database: str, config) -> None:
    writer = shared()
    first, second = workers(writer.address), workers(writer.address)
    submitted = [*first.ask("submit 500"), *second.ask("submit 500")]
    assert first.ask("flush") and second.ask("flush")
    old = writer.pid
    assert old is not None
    # Stopped, it takes batches and acks none: they are in flight when it is killed.
    os.kill(old, signal.SIGSTOP)
    submitted += [*first.ask("submit 400"), *second.ask("submit 400")]
    # Batches encoded and sent, none acked (one held in memory means the window is in flight).
    assert wait_for(lambda: all(size > 0 for _depth, size in (first.ask("held"), second.ask("held"))))
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: writer.pid not in (None, old))
    assert wait_for(lambda: first.ask("spooled") and second.ask("spooled"))
    submitted += [*first.ask("submit 300"), *second.ask("submit 300")]
    # A flush while a worker is not connected again yet ends with its rows in the spool: wait for both.
    assert wait_for(lambda: first.ask("connected") == second.ask("connected") == writer.pid)
    assert first.ask("flush") and second.ask("flush")
    # Replayed, maybe before the worker was connected again to hear of it: its spool gauge is set right anyway.
    assert first.ask("spool") == second.ask("spool") == 0
    assert first.ask("close") and second.ask("close")
    assert writer.close(60)

    rows = landed(read_rows, database)
    assert len(rows) == len(submitted) == 2_400
    assert set(rows) == set(submitted)
    assert writer.restarts == 1
    assert list(Path(config.spool_dir).glob("*.jsonl")) == []


def test_a_killed_worker_loses_only_what_it_had_not_handed_over(shared, workers, read_rows, database: str) -> None:
    writer = shared()
    doomed, survivor = workers(writer.address), workers(writer.address)
    handed_over = doomed.ask("submit 800")
    assert doomed.ask("flush")
    in_hand = doomed.ask("submit 300")
    doomed.kill()
    # A worker killed between a batch's header and its last frame: the writer drops the half batch, serves on.
    with socket.socket(socket.AF_UNIX) as half:
        half.connect(writer.address)
        frame = encode_frame([make_record(request_id="half-a-batch")])
        half.sendall(framed(BATCH + BATCH_HEADER.pack(1, 3)) + framed(frame))
    survived = survivor.ask("submit 600")
    assert survivor.ask("flush") and survivor.ask("close")
    pid = writer.pid
    assert writer.close(60)

    rows = landed(read_rows, database)
    assert len(rows) == len(set(rows)), "no record twice"
    assert set(handed_over) | set(survived) <= set(rows) <= set(handed_over) | set(in_hand) | set(survived)
    assert "half-a-batch" not in rows
    assert writer.restarts == 0 and pid is not None


def test_a_dead_workers_spool_is_replayed_by_the_shared_writer(shared, workers, read_rows, database: str,
                                                               config, tmp_path: Path) -> None:
    # No writer listens yet: the worker spools everything, then dies with its spool on disk.
    lonely = workers(str(tmp_path / "nobody-listens.sock"))
    spooled = lonely.ask("submit 450")
    assert lonely.ask("flush")
    assert lonely.ask("spooled") == 450
    lonely.kill()
    assert len(list(Path(config.spool_dir).glob("*.jsonl"))) > 0

    writer = shared()
    assert writer.close(60)

    assert sorted(landed(read_rows, database)) == sorted(spooled)
    assert list(Path(config.spool_dir).glob("*.jsonl")) == []


def test_only_this_user_reaches_the_socket(shared, workers, tmp_path: Path) -> None:
    writer = shared()
    folder = Path(writer.address).parent
    mode = folder.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.geteuid()
    worker = workers(writer.address)
    assert worker.ask("connected") == writer.pid
    # The system's interpreter: another user may not be able to enter the folders this one lives in.
    python = Path("/usr/bin/python3")
    if os.geteuid() != 0 or not python.exists():
        pytest.skip("connecting as another user needs root and /usr/bin/python3")
    try_connect = textwrap.dedent("""
        import socket, sys
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(sys.argv[1])
            except PermissionError:
                print("refused by the folder")
                raise SystemExit
            sock.settimeout(30)
            print("closed by the writer" if sock.recv(1) == b"" else "served")
    """)

    def as_nobody() -> str:
        done = subprocess.run([str(python), "-c", try_connect, writer.address], user=65534, group=65534,
                              capture_output=True, text=True, timeout=60, cwd="/")
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert as_nobody() == "refused by the folder"
    # With the folder and socket opened to everyone, the writer still asks the kernel who connects.
    folder.chmod(0o755)
    Path(writer.address).chmod(0o777)
    assert as_nobody() == "closed by the writer"
    assert worker.ask("submit 5") and worker.ask("flush")
    assert worker.ask("connected") == writer.pid
