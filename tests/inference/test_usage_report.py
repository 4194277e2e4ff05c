import time
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client

from gateway.inference import report
from gateway.inference.rows import COLUMNS, to_row
from gateway.inference.usage import parse_time
from tests.inference.records import make_record


def insert(client: Client, database: str, records: list[dict]) -> None:
    rows = [to_row(record, log_payloads=True, max_payload_bytes=1_000) for record in records]
    client.insert(f"{database}.inference", rows, column_names=COLUMNS)


def test_report_ranks_users_routes_and_errors(clickhouse: Client, database: str, chdb_dsn: str) -> None:
    now = time.time()
    insert(clickhouse, database, [
        *[make_record(user="alice", cost_micro_usd=2_000_000, ts=now - 60) for _ in range(3)],
        make_record(user="bob", route="embed", cost_micro_usd=10, ts=now - 60),
        make_record(user="bob", status=429, error_type="rate_limit_error", error_code="limited", ts=now - 30),
        make_record(user="carol", cost_micro_usd=99_000_000, ts=now - 3 * 86_400),
    ])
    text = report(chdb_dsn, database, "24h")

    assert "requests 5  errors 1 (20.00%)  rate-limited 1" in text
    users = text.split("Top users by cost")[1].split("\n\n")[0]
    assert users.index("alice") < users.index("bob") and "carol" not in users
    assert "6.0000" in users
    assert "embed" in text.split("Top routes")[1]
    assert "429  rate_limit_error  limited" in text.split("Errors")[-1]


def test_empty_window_reports_zero(clickhouse: Client, database: str, chdb_dsn: str) -> None:
    text = report(chdb_dsn, database, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))
    assert "requests 0  errors 0 (0.00%)" in text and "(none)" in text


def test_parse_time_accepts_spans_and_iso() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    assert parse_time("7d", now) == datetime(2026, 1, 3, tzinfo=UTC)
    assert parse_time("2026-01-01T00:00:00", now) == datetime(2026, 1, 1, tzinfo=UTC)
    try:
        parse_time("yesterday", now)
    except ValueError as error:
        assert "30m, 24h, 7d" in str(error)
    else:
        raise AssertionError("an unreadable time must be refused")


def test_report_shows_what_the_prompt_cache_saved_per_route_and_model(clickhouse: Client, database: str,
                                                                      chdb_dsn: str) -> None:
    now = time.time()
    insert(clickhouse, database, [
        make_record(route="claude", model="claude-haiku-4-5", prompt_tokens=3_010, cached_tokens=2_000,
                    cache_write_tokens=1_000, cost_micro_usd=1_710, cache_savings_micro_usd=1_800, ts=now - 60),
        make_record(route="claude", model="claude-haiku-4-5", prompt_tokens=3_010, cached_tokens=2_000,
                    cost_micro_usd=460, cache_savings_micro_usd=1_800, ts=now - 50),
        make_record(route="plain", model="gpt-4o-mini", cost_micro_usd=99, ts=now - 40),
    ])
    text = report(chdb_dsn, database, "24h")
    cache = text.split("Prompt cache")[1].split("\n\n")[0]
    (line,) = [line for line in cache.splitlines() if line.startswith("claude")]
    assert line.split() == ["claude", "claude-haiku-4-5", "2", "4,000", "1,000", "0.0022", "0.0036"]
    assert "gpt-4o-mini" not in cache
