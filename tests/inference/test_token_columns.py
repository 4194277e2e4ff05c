"""Migration 004: a table made before it gains the token-kind columns, keeps its rows, and rolls up the new ones."""

from __future__ import annotations

import time
import uuid

import pytest

from gateway.inference import connect, migrate, store
from gateway.inference.rows import COLUMNS, to_row
from gateway.inference.store import DEDUP_SETTINGS
from tests.inference.records import make_record

OLD_COLUMNS = [name for name in COLUMNS if name not in {
    "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens", "usage_estimated", "cache_savings_micro_usd"}]


def test_an_older_table_is_migrated_in_place(chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    database = f"lg_{uuid.uuid4().hex[:10]}"
    client = connect(chdb_dsn)
    try:
        every = store.migration_files()
        monkeypatch.setattr(store, "migration_files", lambda: [f for f in every if f[0] < 4])
        assert "004_token_kinds" not in migrate(client, database)
        old = make_record(request_id="old", cached_tokens=5, cost_micro_usd=40, ts=time.time() - 30)
        row = dict(zip(COLUMNS, to_row(old, log_payloads=False, max_payload_bytes=100), strict=True))
        client.insert(f"{database}.inference", [[row[name] for name in OLD_COLUMNS]], column_names=OLD_COLUMNS)

        monkeypatch.setattr(store, "migration_files", lambda: every)
        assert migrate(client, database) == ["004_token_kinds"]
        assert migrate(client, database) == []
        new = make_record(request_id="new", prompt_tokens=3_010, cached_tokens=2_000, cache_write_tokens=1_000,
                          cache_write_1h_tokens=600, reasoning_tokens=7, usage_estimated=True, cost_micro_usd=2_160,
                          cache_savings_micro_usd=1_800, ts=time.time() - 20)
        client.insert(f"{database}.inference", [to_row(new, log_payloads=False, max_payload_bytes=100)],
                      column_names=COLUMNS, settings=DEDUP_SETTINGS)
        rows = client.query(f"SELECT request_id, cached_tokens, cache_write_tokens, cache_write_1h_tokens, "
                            f"reasoning_tokens, usage_estimated, cache_savings_micro_usd FROM {database}.inference "
                            f"ORDER BY request_id").result_rows
        assert rows == [("new", 2_000, 1_000, 600, 7, True, 1_800), ("old", 5, 0, 0, 0, False, 0)]
        rolled = client.query(f"SELECT sum(requests), sum(cached_tokens), sum(cache_write_tokens), "
                              f"sum(cache_write_1h_tokens), sum(reasoning_tokens), sum(estimated_requests), "
                              f"sum(cost_micro_usd), sum(cache_savings_micro_usd) FROM {database}.requests_1m").result_rows
        assert rolled == [(2, 2_005, 1_000, 600, 7, 1, 2_200, 1_800)]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()
