"""No record switches the inference table off: whatever a record holds, it becomes a row and later ones follow."""

from collections.abc import Callable
from typing import Any

import orjson
import pytest

import gateway.inference.holding
import gateway.inference.pending
from gateway.inference import InferenceWriter
from gateway.inference.wire import encode_frame
from tests.inference.records import count_rows, make_record

DEEP_MARKER = "[payload not stored: nested deeper than 255 levels]"


def nested(levels: int, inner: Any) -> Any:
    value = inner
    for _ in range(levels):
        value = {"prompt": value}
    return value


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


def sample(writer: InferenceWriter, name: str, **labels: str) -> float:
    return writer.registry.get_sample_value(f"lockgate_inference_{name}", labels) or 0.0


def stored(writer: InferenceWriter, request_id: str, columns: str) -> tuple[Any, ...]:
    rows = writer.query(f"SELECT {columns} FROM {writer.database}.inference WHERE request_id = '{request_id}'")
    assert len(rows) == 1, rows
    return rows[0]


def test_deep_and_hostile_records_are_rows_and_the_writer_keeps_writing(make_writer) -> None:
    writer = make_writer(batch_rows=50)
    writer.start()
    writer.submit(make_record(request_id="deep", request_payload={"model": "m", "prompt": nested(1_000, "hi")},
                              response_payload=b'{"choices":[]}'))
    writer.submit(make_record(
        request_id="hostile", user="eve\ud800", status=2**70, prompt_tokens=float("inf"), ts=1e30,
        groups=5, fallbacks={"a"}, metadata={"team": Unprintable(), Unprintable(): "x", "deep": nested(400, 1)},
        request_payload={"messages": [{"content": Unprintable()}]}, response_payload="\udcff broken",
    ))
    for _ in range(200):
        writer.submit(make_record())
    assert writer.flush(timeout=60)

    assert count_rows(writer) == (202, 202)
    request, response = stored(writer, "deep", "request_payload, response_payload")
    assert request == DEEP_MARKER
    assert orjson.loads(response) == {"choices": []}
    user, status, tokens, metadata, payload = stored(
        writer, "hostile", "user, status, prompt_tokens, metadata, request_payload")
    assert user.startswith("eve") and status == 65_535 and tokens == 0
    assert metadata["deep"] == "[value not stored: nested deeper than 255 levels]"
    assert "cannot be shown" in metadata["team"]
    assert "cannot be shown" in orjson.loads(payload)["messages"][0]["content"]
    assert sample(writer, "records_unencodable_total", reason="too_deep") >= 1
    assert sample(writer, "errors_total", where="feeder") == 0


def test_payload_just_under_the_depth_limit_is_stored_whole(make_writer) -> None:
    writer = make_writer()
    writer.start()
    deep_but_fine = nested(250, "hi")
    writer.submit(make_record(request_id="fine", request_payload=deep_but_fine))
    assert writer.flush(timeout=60)
    assert orjson.loads(stored(writer, "fine", "request_payload")[0]) == deep_but_fine


def test_encoding_never_raises_on_values_whose_str_raises() -> None:
    reasons: list[tuple[str, str]] = []
    frame = encode_frame([{"request_id": "r", Unprintable(): Unprintable(), "request_payload": {1: Unprintable()}},
                          "not a record"], lambda reason, request_id: reasons.append((reason, request_id)))
    first, second = orjson.loads(frame)
    unprintable = "<Unprintable that cannot be shown>"
    assert first == {"request_id": "r", unprintable: unprintable, "request_payload": {"1": unprintable}}
    assert second == "not a record"
    assert reasons == []  # coerced to text, nothing replaced by a marker


def test_feeder_survives_an_exception_inside_encoding(make_writer, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    real_encode: Callable[..., bytes] = gateway.inference.holding.encode_frame

    def encode_or_fail(records: list[dict[str, Any]], on_unencodable: Any = None) -> bytes:
        if any(record.get("request_id") == "poison" for record in records):
            raise RuntimeError("a bug in encoding")
        return real_encode(records, on_unencodable)

    real_piece: Callable[..., Any] = gateway.inference.pending.record_piece

    def piece_or_fail(record: dict[str, Any], on_unencodable: Any = None) -> Any:
        if record.get("request_id") == "poison":
            raise RuntimeError("a bug in encoding")
        return real_piece(record, on_unencodable)

    # Records are encoded one by one as they are submitted, queued ones a frame at a time by pending, spilled ones a
    # batch at a time by holding.
    monkeypatch.setattr(gateway.inference.holding, "encode_frame", encode_or_fail)
    monkeypatch.setattr(gateway.inference.pending, "encode_frame", encode_or_fail)
    monkeypatch.setattr(gateway.inference.pending, "record_piece", piece_or_fail)
    writer = make_writer(batch_rows=1)
    writer.start()
    for _ in range(3):
        writer.submit(make_record(request_id="poison"))
    assert writer.flush(timeout=60)
    for _ in range(20):
        writer.submit(make_record())
    assert writer.flush(timeout=60)

    assert count_rows(writer) == (20, 20)
    assert sample(writer, "errors_total", where="feeder") == 3
    assert sample(writer, "rows_dropped_total", reason="encoding_failed") == 3
    assert sum("a bug in encoding" in record.getMessage() or "RuntimeError" in record.getMessage()
               for record in caplog.records) == 1, "logged once per kind"
