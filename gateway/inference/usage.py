"""`lockgate usage`: a plain-text usage report read from the inference table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from gateway.inference.store import connect

_RELATIVE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
TOP = 10

_TOTALS = """
SELECT count(), countIf(status >= 400), countIf(status = 429), sum(prompt_tokens), sum(completion_tokens),
       sum(cost_micro_usd) / 1e6, quantile(0.5)(latency_ms), quantile(0.95)(latency_ms)
FROM {db}.inference WHERE {window}"""
_TOP_USERS = """
SELECT user, count() AS requests, countIf(status >= 400), sum(prompt_tokens + completion_tokens),
       sum(cost_micro_usd) / 1e6 AS cost
FROM {db}.inference WHERE {window} GROUP BY user ORDER BY cost DESC, requests DESC LIMIT {top}"""
_TOP_ROUTES = """
SELECT route, count() AS requests, countIf(status >= 400), quantile(0.5)(latency_ms), quantile(0.95)(latency_ms),
       sum(prompt_tokens + completion_tokens), sum(cost_micro_usd) / 1e6 AS cost
FROM {db}.inference WHERE {window} GROUP BY route ORDER BY requests DESC, cost DESC LIMIT {top}"""
_TOP_MODELS = """
SELECT provider, model, count() AS requests, sum(prompt_tokens + completion_tokens), sum(cost_micro_usd) / 1e6 AS cost
FROM {db}.inference WHERE {window} GROUP BY provider, model ORDER BY cost DESC, requests DESC LIMIT {top}"""
_CACHE = """
SELECT route, model, count() AS requests, sum(cached_tokens), sum(cache_write_tokens), sum(cost_micro_usd) / 1e6,
       sum(cache_savings_micro_usd) / 1e6 AS saved
FROM {db}.inference WHERE {window} AND (cached_tokens > 0 OR cache_write_tokens > 0)
GROUP BY route, model ORDER BY saved DESC, requests DESC LIMIT {top}"""
_ERRORS = """
SELECT status, error_type, error_code, count() AS requests
FROM {db}.inference WHERE {window} AND status >= 400
GROUP BY status, error_type, error_code ORDER BY requests DESC LIMIT {top}"""


def parse_time(value: datetime | str, now: datetime | None = None) -> datetime:
    """A datetime, "now", a span back from now ("30m", "24h", "7d", "2w"), or an ISO 8601 time (UTC if naive)."""
    now = now or datetime.now(UTC)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = value.strip()
    if text == "now":
        return now
    if match := _RELATIVE.match(text):
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read time {value!r}: use now, 30m, 24h, 7d, 2w or an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    lines = [title, "  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.rjust(width) if _numeric(cell) else cell.ljust(width)
                        for cell, width in zip(row, widths, strict=True)) for row in cells]
    if not cells:
        lines.append("(none)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value) or "-"


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(".", "").replace("-", "").isdigit()


def build_report(client: Client, database: str, since: datetime, until: datetime) -> str:
    window = f"ts >= fromUnixTimestamp64Milli({int(since.timestamp() * 1000)}) " \
             f"AND ts < fromUnixTimestamp64Milli({int(until.timestamp() * 1000)})"

    def rows(sql: str) -> list[Sequence[Any]]:
        return client.query(sql.format(db=database, window=window, top=TOP)).result_rows

    requests, errors, limited, prompt, completion, cost, p50, p95 = rows(_TOTALS)[0]
    if not requests:
        p50 = p95 = 0.0
    error_rate = 100.0 * errors / requests if requests else 0.0
    sections = [
        f"lockgate usage {since:%Y-%m-%d %H:%M} .. {until:%Y-%m-%d %H:%M} UTC",
        f"requests {requests:,}  errors {errors:,} ({error_rate:.2f}%)  rate-limited {limited:,}  "
        f"tokens {prompt:,} in / {completion:,} out  cost ${cost:,.4f}  latency p50 {p50:.0f} ms p95 {p95:.0f} ms",
        _table("Top users by cost", ["user", "requests", "errors", "tokens", "cost $"], rows(_TOP_USERS)),
        _table("Top routes", ["route", "requests", "errors", "p50 ms", "p95 ms", "tokens", "cost $"],
               rows(_TOP_ROUTES)),
        _table("Top models by cost", ["provider", "model", "requests", "tokens", "cost $"], rows(_TOP_MODELS)),
        _table("Prompt cache (saved: what cache reads saved against the input price)",
               ["route", "model", "requests", "cache read", "cache write", "cost $", "saved $"], rows(_CACHE)),
        _table("Errors", ["status", "type", "code", "requests"], rows(_ERRORS)),
    ]
    return "\n\n".join(sections) + "\n"


def report(dsn: str, database: str, since: datetime | str, until: datetime | str = "now") -> str:
    """The usage report for [since, until). With a chdb:// DSN the gateway must not hold the folder meanwhile."""
    now = datetime.now(UTC)
    start, end = parse_time(since, now), parse_time(until, now)
    client = connect(dsn)
    try:
        return build_report(client, database, start, end)
    finally:
        client.close()
