"""The writer's ClickHouse work runs in its own process: what happens when that process dies, and when it ends."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from gateway.inference import InferenceQueryError, InferenceWriter
from gateway.inference.child import uncollected
from tests.inference.records import count_rows, make_record, rollup_requests
from tests.served import alive

REPO = Path(__file__).resolve().parents[2]


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def written(writer: InferenceWriter) -> float:
    return writer.registry.get_sample_value("lockgate_inference_rows_written_total") or 0.0


def test_killed_writer_process_loses_and_duplicates_nothing(make_writer) -> None:
    writer = make_writer(batch_rows=200)
    writer.start()
    for _ in range(1_500):
        writer.submit(make_record())
    assert wait_for(lambda: written(writer) > 0)
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(1_500):
        writer.submit(make_record())
    assert writer.flush(timeout=60)

    assert writer.pid not in (None, first)
    assert count_rows(writer) == (3_000, 3_000)
    assert rollup_requests(writer) == 3_000
    assert writer.registry.get_sample_value("lockgate_inference_process_restarts_total") == 1


def test_a_batch_written_before_a_crash_and_replayed_after_it_is_counted_once(make_writer) -> None:
    """The process that created the tables wrote the batch and died before its ack: the next process replays it."""
    records = [make_record() for _ in range(50)]
    writer = make_writer()
    writer.start()
    for record in records:
        writer.submit(record)
    assert writer.flush()
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # What the gateway does with a batch whose ack the dead process never sent.
    writer.spool.write(records)
    assert wait_for(lambda: writer.pid not in (None, first))
    assert writer.flush(timeout=60)

    assert writer.spool.files() == []
    assert count_rows(writer) == (50, 50)
    assert rollup_requests(writer) == 50


def test_close_ends_the_writer_process(make_writer, refused_dsn: str) -> None:
    up = make_writer()
    down = make_writer(refused_dsn, spool_dir=up.spool.directory.parent / "spool-down")
    pids = []
    for writer in (up, down):
        writer.start()
        writer.submit(make_record())
        assert writer.flush()
        pids.append(writer.pid)
        assert writer.close(timeout=20)
    assert writer.pid is None
    assert not any(alive(pid) for pid in pids)
    assert down.spool.rows == 1


def test_writer_process_exits_when_the_gateway_process_is_killed(refused_dsn: str, tmp_path: Path) -> None:
    gateway = textwrap.dedent(f"""
        import time
        from prometheus_client import CollectorRegistry
        from gateway.inference import InferenceWriter
        writer = InferenceWriter({refused_dsn!r}, "lg", spool_dir={str(tmp_path / 'spool')!r},
                                 registry=CollectorRegistry())
        writer.start()
        print(writer.pid, flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", gateway], cwd=REPO, stdout=subprocess.PIPE)
    child = int(process.stdout.readline())
    assert alive(child)
    process.kill()
    process.wait()
    process.stdout.close()
    assert wait_for(lambda: not alive(child))


def test_payload_objects_are_stored_as_json(make_writer) -> None:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo 'quoted'"}], "n": 1}
    writer = make_writer()
    writer.start()
    writer.submit(make_record(request_id="objects", request_payload=request, response_payload=[{"choices": []}]))
    writer.submit(make_record(request_id="bytes", request_payload='{"a":"é"}'.encode(), response_payload=None))
    assert writer.flush()
    stored = dict((row[0], row[1:]) for row in writer.query(
        f"SELECT request_id, request_payload, response_payload FROM {writer.database}.inference"
    ))
    assert orjson.loads(stored["objects"][0]) == request
    assert orjson.loads(stored["objects"][1]) == [{"choices": []}]
    assert stored["bytes"] == ('{"a":"é"}', "")


def test_query_says_why_when_clickhouse_is_away(make_writer, refused_dsn: str) -> None:
    writer = make_writer(refused_dsn)
    writer.start()
    with pytest.raises(InferenceQueryError, match="unavailable"):
        writer.query("SELECT 1")


def test_the_collector_is_back_on_after_a_batch_whatever_became_of_it() -> None:
    # The writer process turns the cyclic collector off for each batch; a batch that fails must not leave it off,
    # or the process would leak every cycle it ever makes.
    assert gc.isenabled()
    with uncollected():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), uncollected():
        raise ValueError("a batch ClickHouse refused")
    assert gc.isenabled()
    gc.disable()
    try:
        with uncollected():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
