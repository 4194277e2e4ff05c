import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gateway.inference.rows import COLUMNS, to_row
from gateway.inference.store import DEDUP_SETTINGS
from tests.dashboards.grafana_macros import ALL, Variable, expand

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "dashboards" / "grafana"
DASHBOARDS = sorted(GRAFANA_DIR.glob("*.json"))
NOW = int(time.time())
START, END, INTERVAL = NOW - 6 * 3600, NOW + 60, 300

USERS = {"alice": ["eng", "ml"], "bob": ["eng"], "carol": ["finance"], "dave": []}
ROUTES = {"chat-default": ["openai/gpt-4o-mini", "anthropic/claude-haiku"], "embed": ["openai/text-embed"],
          "local": ["runtime/smollm2"]}
STATUS_CYCLE = [200, 200, 200, 200, 200, 200, 429, 403, 400, 502]
RECORDS = 1_200


def sample_records() -> list[dict[str, Any]]:
    records = []
    for index in range(RECORDS):
        user = list(USERS)[index % 4]
        route = list(ROUTES)[index % 3]
        arm = ROUTES[route][index % len(ROUTES[route])]
        status = STATUS_CYCLE[index % 10]
        blocked = status == 400
        records.append({
            "request_id": f"req-{index:05d}", "ts": START + 60 + index * 17.0, "key_id": f"key-{user}",
            "user": user, "groups": USERS[user], "route": route, "provider": arm.split("/")[0],
            "model": arm.split("/")[1], "endpoint": "embeddings" if route == "embed" else "chat", "status": status,
            "error_type": "" if status == 200 else "invalid_request_error", "error_code": str(status),
            "streamed": index % 2 == 0, "prompt_tokens": 20 + index % 50, "completion_tokens": 40,
            "cached_tokens": 5 * (index % 4), "cache_write_tokens": 8 if index % 6 == 0 else 0,
            "cache_write_1h_tokens": 8 if index % 12 == 0 else 0, "reasoning_tokens": index % 3,
            "usage_estimated": index % 13 == 0, "cache_savings_micro_usd": 3 * (index % 4),
            "cost_micro_usd": 100 * (1 + index % 9), "latency_ms": 50.0 + index % 300, "ttft_ms": 20.0 + index % 40,
            "upstream_ms": 45.0, "overhead_ms": 1.0 + index % 5, "attempts": 1 + index % 2,
            "fallbacks": ["openai/gpt-4o-mini -> 503"] if index % 7 == 0 else [], "split_arm": arm,
            "guardrail_findings": [{"direction": "in", "entity": "EMAIL_ADDRESS", "action": "block" if blocked
                                    else "mask", "count": 1}] if index % 5 == 3 or blocked else [],
            "guardrail_action": "block" if blocked else ("mask" if index % 5 == 3 else ""),
            "ratelimit_outcome": f"limited:requests:user:{user}" if status == 429 else "ok",
            "is_shadow": index % 11 == 0,
        })
    return records


@pytest.fixture(scope="module")
def loaded(grafana_client: Client) -> list[dict[str, Any]]:
    records = sample_records()
    rows = [to_row(record, log_payloads=True, max_payload_bytes=1_000) for record in records]
    grafana_client.insert("inference", rows, column_names=COLUMNS, settings=DEDUP_SETTINGS)
    return records


def dashboard_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, panel type, rawSql) for every panel target of every dashboard."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append((path.name, panel["title"], panel["type"], target["rawSql"]))
    return queries


SELECTIONS = {
    "all": {"route": [ALL], "user": [ALL], "group": [ALL], "model": [ALL]},
    "picked": {"route": ["chat-default", "local"], "user": ["alice", "bob"], "group": ["eng"],
               "model": ["gpt-4o-mini", "smollm2"]},
}


def variables(selection: str, records: list[dict[str, Any]]) -> dict[str, Variable]:
    options = {
        "route": sorted({r["route"] for r in records}), "user": sorted({r["user"] for r in records}),
        "group": sorted({g for r in records for g in r["groups"]}), "model": sorted({r["model"] for r in records}),
    }
    return {name: Variable(SELECTIONS[selection][name], options[name]) for name in options}


def run(client: Client, sql: str, selection: str, records: list[dict[str, Any]]):
    return client.query(expand(sql, variables(selection, records), START, END, INTERVAL))


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize(("dashboard", "title", "kind", "sql"), dashboard_queries(),
                         ids=[f"{d}:{t}" for d, t, _, _ in dashboard_queries()])
def test_every_panel_query_runs_and_returns_its_shape(
    grafana_client: Client, loaded: list[dict[str, Any]], dashboard: str, title: str, kind: str, sql: str,
    selection: str,
) -> None:
    result = run(grafana_client, sql, selection, loaded)
    names = list(result.column_names)
    assert result.result_rows, f"{dashboard} / {title} returned no rows"
    assert len(set(names)) == len(names)
    if kind == "timeseries":
        assert names[0] == "time"
        assert all(isinstance(row[0], datetime) for row in result.result_rows)
        assert any(isinstance(value, int | float) for value in result.result_rows[0][1:])
    if kind == "stat":
        assert len(result.result_rows) == 1
        assert all(isinstance(value, int | float) for value in result.result_rows[0])


def test_picked_variables_filter_the_numbers(grafana_client: Client, loaded: list[dict[str, Any]]) -> None:
    overview = json.loads((GRAFANA_DIR / "overview.json").read_text())
    requests_sql = next(p for p in overview["panels"] if p["title"] == "Requests")["targets"][0]["rawSql"]
    picked = SELECTIONS["picked"]
    expected = sum(
        1 for r in loaded if r["route"] in picked["route"] and r["user"] in picked["user"]
        and r["model"] in picked["model"] and set(r["groups"]) & set(picked["group"])
    )
    assert 0 < expected < len(loaded)
    assert run(grafana_client, requests_sql, "picked", loaded).result_rows == [(expected,)]
    assert run(grafana_client, requests_sql, "all", loaded).result_rows == [(len(loaded),)]


def test_traffic_split_compares_every_arm(grafana_client: Client, loaded: list[dict[str, Any]]) -> None:
    split = json.loads((GRAFANA_DIR / "traffic_split.json").read_text())
    sql = next(p for p in split["panels"] if p["title"] == "Arms compared")["targets"][0]["rawSql"]
    result = run(grafana_client, sql, "all", loaded)
    arms = {(row[0], row[1]) for row in result.result_rows}
    assert arms == {(route, arm) for route, route_arms in ROUTES.items() for arm in route_arms}
    assert {"p50_ms", "p90_ms", "p99_ms", "error_rate", "cost_per_request_usd"} <= set(result.column_names)


def test_cache_savings_panel_sums_reads_writes_and_savings_per_route_and_model(
    grafana_client: Client, loaded: list[dict[str, Any]]
) -> None:
    cost = json.loads((GRAFANA_DIR / "cost_usage.json").read_text())
    sql = next(p for p in cost["panels"] if p["title"] == "Prompt cache savings by route and model")["targets"][0]["rawSql"]
    result = run(grafana_client, sql, "all", loaded)
    got = {(row[0], row[1]): row[2:] for row in result.result_rows}
    expected: dict[tuple[str, str], list] = {}
    for r in loaded:
        if r["cached_tokens"] or r["cache_write_tokens"]:
            sums = expected.setdefault((r["route"], r["model"]), [0, 0, 0, 0, 0])
            sums[0] += 1
            sums[1] += r["cached_tokens"]
            sums[2] += r["cache_write_tokens"]
            sums[4] += r["cache_savings_micro_usd"]
    picked = {key: (requests, reads, writes, saved) for key, (requests, reads, writes, _, saved) in expected.items()}
    # The roll-up counts every request of a route and model in the range, so its request count may be larger.
    assert set(got) == set(picked)
    for key, (requests, reads, writes, saved) in picked.items():
        assert got[key][1:3] == (reads, writes) and round(got[key][4] * 1e6) == saved and got[key][0] >= requests


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_template_variables_list_the_values_in_the_table(
    grafana_client: Client, loaded: list[dict[str, Any]], path: Path
) -> None:
    templating = json.loads(path.read_text())["templating"]["list"]
    assert {variable["name"] for variable in templating} == {"route", "user", "group", "model"}
    for variable in templating:
        assert variable["multi"] and variable["includeAll"]
        values = [row[0] for row in run(grafana_client, variable["query"]["rawSql"], "all", loaded).result_rows]
        assert values == variables("all", loaded)[variable["name"]].options
