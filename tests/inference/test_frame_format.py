"""Frames that carry payloads apart (format 2) store exactly the rows format-1 frames stored, and spool files of both
formats replay, once."""

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.context import BACKLOG_FULL, UNREADABLE, WITHHELD
from gateway.inference.rows import COLUMNS, safe_row, to_columns
from gateway.inference.spool import Spool
from gateway.inference.wire import SPLIT_FRAME, _dumps, _encode_any, decode_frames, encode_frame
from tests.inference.records import count_rows, make_record

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # non-ASCII, emoji, controls
JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False) | TEXT)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=25)
MARKERS = st.sampled_from([WITHHELD, BACKLOG_FULL, UNREADABLE, "[payload not stored: nested deeper than 255 levels]"])
PAYLOADS = (st.none() | MARKERS | TEXT | JSON | st.dictionaries(TEXT, JSON, max_size=5)
            | st.binary(max_size=60) | JSON.map(orjson.dumps) | st.builds(lambda text: text.encode(), TEXT)
            | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.just(math.nan))
ODD_VALUES = st.none() | JSON | st.binary(max_size=8)
FIELDS = st.sampled_from([name for name in COLUMNS if name not in ("request_id", "payload_truncated")])


def format_1_frame(records: list[Any]) -> bytes:
    """A frame as the gateway wrote them before format 2: the records' array in one call, record by record if not."""
    try:
        return _dumps(records)
    except Exception:
        return b"[" + b",".join(_encode_any(record, None) for record in records) + b"]"


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    record = make_record(request_id=draw(TEXT), request_payload=draw(PAYLOADS), response_payload=draw(PAYLOADS))
    for name in draw(st.lists(FIELDS, max_size=4)):
        record[name] = draw(ODD_VALUES)
    for name in draw(st.lists(FIELDS, max_size=2)):
        record.pop(name, None)
    return record


def rows_as_before(batch: list[dict[str, Any]], log_payloads: bool, max_bytes: int) -> list[str]:
    """Format-1 frames, decoded and typed record by record: what the writer did before format 2."""
    decoded = decode_frames([format_1_frame(batch)])
    return [repr(safe_row(record, log_payloads=log_payloads, max_payload_bytes=max_bytes)[0]) for record in decoded]


def rows_now(batch: list[dict[str, Any]], log_payloads: bool, max_bytes: int) -> list[str]:
    columns, untypable = to_columns(decode_frames([encode_frame(batch)]), log_payloads=log_payloads,
                                    max_payload_bytes=max_bytes)
    assert untypable == []
    return [repr(list(row)) for row in zip(*columns, strict=True)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(records(), min_size=1, max_size=6), log_payloads=st.booleans(),
       max_bytes=st.sampled_from([0, 16, 60, 200, 65_536]))
def test_payloads_apart_store_the_rows_format_1_stored(batch: list[dict[str, Any]], log_payloads: bool,
                                                       max_bytes: int) -> None:
    assert rows_now(batch, log_payloads, max_bytes) == rows_as_before(batch, log_payloads, max_bytes)


def test_answer_bodies_travel_as_they_are_and_are_stored_as_they_came() -> None:
    body = '{"id": "chatcmpl-1",\n "choices": [{"message": {"content": "Grüße, 世界 🌍"}}]}\n'.encode()
    frame = encode_frame([make_record(request_id="r", response_payload=body,
                                      request_payload={"messages": [{"role": "user", "content": "naïve"}]})])
    assert frame[:1] == SPLIT_FRAME and body in frame, "the answer body is in the frame byte for byte"
    (record,) = decode_frames([frame])
    assert record["response_payload"] == body
    columns, _ = to_columns([record], log_payloads=True, max_payload_bytes=65_536)
    assert columns[COLUMNS.index("response_payload")] == [body.decode()]
    assert orjson.loads(columns[COLUMNS.index("request_payload")][0]) == {
        "messages": [{"role": "user", "content": "naïve"}]}


def test_a_frame_that_does_not_add_up_is_refused() -> None:
    frame = encode_frame([make_record(response_payload=b'{"a": 1}')])
    for damaged in (frame[:-1], frame + b"x", frame[:3], frame[:12]):
        with pytest.raises(ValueError):
            decode_frames([damaged])


def test_payloads_deeper_than_a_frame_allows_get_the_marker_as_before() -> None:
    def nested(levels: int) -> Any:
        value: Any = "hi"
        for _ in range(levels):
            value = [value]
        return value

    for levels in (200, 252, 253, 254, 255, 300):
        batch = [make_record(request_payload=nested(levels))]
        assert rows_now(batch, True, 1 << 20) == rows_as_before(batch, True, 1 << 20), levels


def test_format_1_spool_files_still_replay_and_a_batch_in_both_formats_lands_once(make_writer) -> None:
    batch = [make_record(request_payload={"messages": [{"role": "user", "content": f"question {n} ünïcode"}]},
                         response_payload=b'{"choices": [{"text": "answer\\n"}]}') for n in range(100)]
    writer = make_writer()
    # As earlier versions wrote them: one JSON frame a line, no format line.
    old = writer.spool.directory / "00000000000000000001-1-00000000-100r.jsonl"
    old.write_bytes(b"".join(format_1_frame(batch[start:start + 64]) + b"\n" for start in (0, 64)))
    writer.spool.write(batch)
    writer.start()
    assert writer.flush()

    assert count_rows(writer) == (100, 100)
    stored = writer.query(f"SELECT request_payload, response_payload FROM {writer.database}.inference "
                          "WHERE request_id = '" + batch[7]["request_id"] + "'")
    assert stored == [('{"messages":[{"role":"user","content":"question 7 ünïcode"}]}',
                       '{"choices": [{"text": "answer\\n"}]}')]
    assert writer.spool.files() == []


def test_damaged_format_2_spool_file_is_set_aside(make_writer, tmp_path: Path) -> None:
    writer = make_writer()
    path = Spool(tmp_path / "elsewhere").write([make_record(response_payload=b"x" * 100) for _ in range(3)])
    (writer.spool.directory / path.name).write_bytes(path.read_bytes()[:-10])
    writer.spool.write([make_record() for _ in range(4)])
    writer.start()
    assert writer.flush()
    assert count_rows(writer) == (4, 4)
    assert writer.registry.get_sample_value("lockgate_inference_rows_dropped_total", {"reason": "unreadable_spool"}) == 3
    assert [entry.name for entry in writer.spool.rejected_directory.iterdir()] == [path.name]
