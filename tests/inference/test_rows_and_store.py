from clickhouse_connect.driver.client import Client

from gateway.inference import COLUMNS, migrate, to_row, truncate_payload
from tests.inference.records import make_record


def test_missing_fields_become_empty_values() -> None:
    row = dict(zip(COLUMNS, to_row({"request_id": "r1"}, log_payloads=True, max_payload_bytes=100), strict=True))
    assert row["request_id"] == "r1"
    assert row["groups"] == [] and row["metadata"] == {} and row["guardrail_findings"] == []
    assert row["status"] == 0 and row["latency_ms"] == 0.0 and row["streamed"] is False


def test_findings_metadata_and_out_of_range_numbers_are_typed() -> None:
    record = make_record(
        guardrail_findings=[{"direction": "in", "entity": "EMAIL_ADDRESS", "action": "mask", "count": 2}],
        metadata={"tags": ["a"], "n": 1}, attempts=1_000, prompt_tokens=-5, latency_ms=float("nan"),
    )
    row = dict(zip(COLUMNS, to_row(record, log_payloads=True, max_payload_bytes=10_000), strict=True))
    assert row["guardrail_findings"] == [("in", "EMAIL_ADDRESS", "mask", 2)]
    assert row["metadata"] == {"tags": "['a']", "n": "1"}
    assert (row["attempts"], row["prompt_tokens"], row["latency_ms"]) == (255, 0, 0.0)


def test_truncation_keeps_utf8_valid_and_within_limit() -> None:
    text, cut = truncate_payload("é" * 1_000, 101)
    assert cut and len(text.encode()) <= 101 and text.endswith("[truncated by lockgate: 2000 bytes]")
    assert truncate_payload("short", 101) == ("short", False)


def test_migrate_is_versioned_and_idempotent(clickhouse: Client, database: str) -> None:
    assert migrate(clickhouse, database) == []
    versions = clickhouse.query(f"SELECT version, name FROM {database}.schema_migrations ORDER BY version")
    assert versions.result_rows == [(1, "001_inference"), (2, "002_rollups"), (3, "003_date_column"),
                                    (4, "004_token_kinds")]
    columns = clickhouse.query(f"SELECT name, type FROM system.columns WHERE database = '{database}' "
                               "AND table = 'inference' AND name IN ('ts', 'date')")
    assert dict(columns.result_rows) == {"ts": "DateTime64(3, 'UTC')", "date": "Date"}
    tables = clickhouse.query(f"SELECT name, engine FROM system.tables WHERE database = '{database}' ORDER BY name")
    assert dict(tables.result_rows) == {
        "inference": "ReplacingMergeTree", "requests_1m": "AggregatingMergeTree",
        "requests_1m_mv": "MaterializedView", "schema_migrations": "MergeTree",
    }


def test_payload_ttl_follows_policy_after_creation(clickhouse: Client, database: str) -> None:
    migrate(clickhouse, database, payload_ttl_days=7)
    ddl = clickhouse.command(f"SHOW CREATE TABLE {database}.inference")
    assert "response_payload` String CODEC(ZSTD(3)) TTL toDateTime(ts) + toIntervalDay(7)" in ddl.replace("\\n", " ")
