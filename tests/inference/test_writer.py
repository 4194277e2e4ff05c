import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from gateway.inference import InferenceWriter
from gateway.inference.rows import TRUNCATION_MARKER
from tests.inference.clickhouse_switch import SlowClickHouse, SwitchableClickHouse
from tests.inference.records import count_rows, make_record, rollup_requests


def sample(writer: InferenceWriter, name: str, **labels: str) -> float | None:
    return writer.registry.get_sample_value(f"lockgate_inference_{name}", labels)


def test_records_land_exactly_once_in_table_and_rollup(make_writer) -> None:
    writer = make_writer(batch_rows=400)
    writer.start()
    for _ in range(1_000):
        writer.submit(make_record())
    assert writer.flush()

    assert count_rows(writer) == (1_000, 1_000)
    assert rollup_requests(writer) == 1_000
    assert sample(writer, "rows_written_total") == 1_000


def test_replayed_batch_is_not_duplicated(make_writer) -> None:
    """An insert that landed although the client saw an error is spooled and replayed: the replay is discarded."""
    records = [make_record() for _ in range(50)]
    writer = make_writer()
    writer.spool.write(records)
    writer.spool.write(records)
    writer.start()
    assert writer.flush()

    assert count_rows(writer) == (50, 50)
    assert rollup_requests(writer) == 50
    assert writer.spool.rows == 0 and writer.spool.files() == []


def test_outage_spools_then_replays_every_record_once(make_writer, chdb_dsn: str, refused_dsn: str,
                                                       tmp_path: Path) -> None:
    clickhouse_server = SwitchableClickHouse(chdb_dsn, refused_dsn, tmp_path / "switch")
    writer = make_writer(batch_rows=200, queue_max=300, connect_client=clickhouse_server)
    writer.start()
    total = 2_000
    for index in range(total):
        writer.submit(make_record(user=f"user-{index % 7}"))
        # submit() only appends: the queue never holds more than queue_max, a full one is spilled to disk
        assert writer.queue_depth < 300
    assert writer.flush()
    assert not writer.connected
    assert writer.spool.rows == total
    assert sample(writer, "rows_written_total") == 0
    assert sample(writer, "rows_dropped_total", reason="unreadable_spool") is None
    # submit() never tried to reach ClickHouse itself: connection attempts are the writer's, with backoff
    assert clickhouse_server.attempts < 10

    clickhouse_server.down = False
    assert writer.flush()

    assert writer.connected
    assert count_rows(writer) == (total, total)
    assert rollup_requests(writer) == total
    assert writer.spool.rows == 0 and writer.spool.bytes == 0
    assert sample(writer, "rows_written_total") == total


def test_a_writer_behind_on_its_inserts_still_sends_full_batches(make_writer, chdb_dsn: str, tmp_path: Path) -> None:
    """ClickHouse slower than the traffic: batches wait for the window. The records that arrive meanwhile go out as
    full batches or once an interval, never as a batch for each ack (each insert costs the embedded engine ~40 ms of
    CPU whatever its size: a batch an ack is what once made the writer take a core)."""
    clickhouse_server = SlowClickHouse(chdb_dsn, tmp_path / "inserts", delay_s=0.25)
    writer = make_writer(connect_client=clickhouse_server, batch_rows=100, flush_interval_ms=1_000)
    writer.start()
    for _ in range(2_000):
        writer.submit(make_record())
    trickled, until = 0, time.monotonic() + 4
    while time.monotonic() < until:
        writer.submit(make_record())
        trickled += 1
        time.sleep(0.01)
    assert writer.flush(timeout=60)

    sizes = clickhouse_server.insert_rows()
    assert sum(sizes) == 2_000 + trickled
    assert count_rows(writer) == (2_000 + trickled, 2_000 + trickled)
    # Four seconds of trickle at a 1 s interval: a partial batch a second, one for the flush, one for timing's sake.
    partial = [size for size in sizes if size < 100]
    assert len(partial) <= 6, sizes


def test_records_wait_for_their_batch_encoded(make_writer, chdb_dsn: str, tmp_path: Path) -> None:
    """Records are encoded a frame at a time as they arrive, not when their batch is full: a batch's worth waits as
    bytes (fewer of them, and nothing the cyclic collector walks), and still goes out as one insert."""
    clickhouse_server = SlowClickHouse(chdb_dsn, tmp_path / "inserts", delay_s=0.0)
    writer = make_writer(connect_client=clickhouse_server, batch_rows=1_000, flush_interval_ms=60_000)
    writer.start()
    for _ in range(640):
        writer.submit(make_record())
    deadline = time.monotonic() + 30
    while writer.queue_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.queue_depth == 0
    assert writer.queue_bytes > 640 * 200
    assert sample(writer, "rows_written_total") in (None, 0)
    assert writer.flush(timeout=60)

    assert clickhouse_server.insert_rows() == [640]
    assert count_rows(writer) == (640, 640)
    assert writer.queue_bytes == 0


def test_a_running_writer_encodes_each_record_as_it_is_submitted(make_writer) -> None:
    """No record waits unencoded for the feeder thread: both need the interpreter's lock, and handing them over cost
    more than encoding them."""
    writer = make_writer(batch_rows=1_000, flush_interval_ms=60_000)
    writer.start()
    held = []
    for _ in range(10):
        writer.submit(make_record())
        held.append((writer.queue_depth, writer.queue_bytes))
    assert [depth for depth, _ in held] == [0] * 10
    assert all(200 < earlier < later for (_, earlier), (_, later) in itertools.pairwise(held))
    assert writer.flush(timeout=60)
    assert count_rows(writer) == (10, 10)
    assert writer.queue_bytes == 0


def test_records_queued_before_start_and_those_after_land_once_in_batches_of_batch_rows(
        make_writer, chdb_dsn: str, tmp_path: Path) -> None:
    """The feeder encodes the records that waited for it while new ones are encoded as they are submitted."""
    clickhouse_server = SlowClickHouse(chdb_dsn, tmp_path / "inserts", delay_s=0.0)
    writer = make_writer(connect_client=clickhouse_server, batch_rows=100, flush_interval_ms=60_000)
    for _ in range(170):
        writer.submit(make_record())
    assert writer.queue_depth == 170
    writer.start()
    for _ in range(330):
        writer.submit(make_record())
    assert writer.flush(timeout=60)

    assert count_rows(writer) == (500, 500)
    inserts = clickhouse_server.insert_rows()
    assert sum(inserts) == 500 and max(inserts) <= 100
    assert writer.queue_depth == 0 and writer.queue_bytes == 0


def test_full_queue_spills_to_spool_without_dropping(make_writer, refused_dsn: str) -> None:
    writer = make_writer(refused_dsn, queue_max=100, batch_rows=1_000, flush_interval_ms=60_000)
    for _ in range(450):
        writer.submit(make_record())
    assert writer.queue_depth == 50
    writer.start()
    assert writer.flush()
    assert writer.spool.rows == 450
    assert sample(writer, "rows_spooled_total") == 450


def test_close_writes_everything_still_queued(make_writer, read_rows: Callable[[str], list[Any]],
                                              database: str) -> None:
    writer = make_writer(batch_rows=10_000, flush_interval_ms=60_000)
    writer.start()
    for _ in range(321):
        writer.submit(make_record())
    assert writer.close(timeout=20)
    # The writer process has let go of the chdb folder: this process may open it now.
    assert read_rows(f"SELECT count(), uniqExact(request_id) FROM {database}.inference") == [(321, 321)]


def test_close_while_clickhouse_is_down_keeps_records_in_spool(make_writer, refused_dsn: str) -> None:
    writer = make_writer(refused_dsn, flush_interval_ms=60_000)
    writer.start()
    for _ in range(77):
        writer.submit(make_record())
    writer.close(timeout=20)
    assert writer.spool.rows == 77


def test_oversize_payload_is_truncated_with_marker(make_writer) -> None:
    writer = make_writer(max_payload_bytes=1_000)
    writer.start()
    writer.submit(make_record(request_id="big", request_payload="x" * 50_000))
    assert writer.flush()
    payload, truncated = writer.query(
        f"SELECT request_payload, payload_truncated FROM {writer.database}.inference WHERE request_id = 'big'"
    )[0]
    assert truncated is True
    assert len(payload.encode()) <= 1_000
    assert payload.endswith(TRUNCATION_MARKER.format(size=50_000))


def test_payloads_not_logged_when_policy_says_so(make_writer) -> None:
    writer = make_writer(log_payloads=False)
    writer.start()
    writer.submit(make_record(request_id="quiet"))
    assert writer.flush()
    row = writer.query(f"SELECT request_payload, response_payload, prompt_tokens FROM {writer.database}.inference")
    assert row == [("", "", 12)]


def test_unreadable_spool_file_is_set_aside_and_counted(make_writer) -> None:
    writer = make_writer()
    (writer.spool.directory / "00000000000000000001-1-00000000.jsonl").write_bytes(b"{not json\n")
    writer.spool.write([make_record() for _ in range(5)])
    writer.start()
    assert writer.flush()
    assert count_rows(writer) == (5, 5)
    assert sample(writer, "rows_dropped_total", reason="unreadable_spool") == 1
    assert [path.name for path in writer.spool.rejected_directory.iterdir()] == [
        "00000000000000000001-1-00000000.jsonl"
    ]


def test_metrics_are_exported_with_prefix(make_writer) -> None:
    registry = CollectorRegistry()
    make_writer(registry=registry)
    exposition = generate_latest(registry).decode()
    for name in ("queue_depth", "queue_bytes", "spool_bytes", "spool_rows", "rows_written_total", "rows_failed_total",
                 "rows_spooled_total", "process_restarts_total"):
        assert f"lockgate_inference_{name} " in exposition
