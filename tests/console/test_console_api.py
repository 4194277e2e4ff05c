"""The console's page and API over plain HTTP: a strict CSP, sign-in, usage scoped to the caller, admin-only parts."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from gateway.api.console import STATIC_DIR
from gateway.app import create_app
from tests.console.conftest import (
    ALICE_KEY,
    BOB_KEY,
    ONEIL,
    ONEIL_KEY,
    ROOT_KEY,
    chat,
    console_policy,
    flushed,
    get,
)


@pytest.fixture
async def gateway(aiohttp_server, fake_openai, tmp_path: Path):
    _, upstream = fake_openai
    url = str(upstream.make_url("/v1"))
    return await aiohttp_server(create_app(console_policy(tmp_path, url, url)))


@pytest.fixture
async def gateway_without_table(aiohttp_server, fake_openai, tmp_path: Path):
    _, upstream = fake_openai
    url = str(upstream.make_url("/v1"))
    return await aiohttp_server(create_app(console_policy(tmp_path, url, url, table=False)))


async def test_the_page_loads_only_its_own_files_under_a_csp_without_inline_code(gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/console")) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            csp = resp.headers["Content-Security-Policy"]
            html = await resp.text()
            etag = resp.headers["ETag"]
        directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="/console/static/' in attrs and not body.strip() for attrs, body in scripts)
        assert "<style" not in html and not re.search(r"\s(style|on[a-z]+)=", html)
        async with session.get(gateway.make_url("/console"), headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                           ("vendor/uPlot.iife.min.js", "text/javascript")):
            async with session.get(gateway.make_url(f"/console/static/{name}")) as resp:
                assert resp.status == 200 and resp.content_type == kind
                assert resp.headers["Content-Security-Policy"] == csp
        for name in ("nope.js", "../api/console.py", "vendor/uPlot-LICENSE.txt", "%2e%2e/app.py"):
            async with session.get(gateway.make_url(f"/console/static/{name}")) as resp:
                assert resp.status == 404, name


def test_the_script_never_parses_text_as_html() -> None:
    script = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage", "document.cookie"):
        assert sink not in script, sink


async def test_signing_in_tells_who_the_key_is_and_whether_it_may_govern(gateway) -> None:
    status, body = await get(gateway, "/console/api/me")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = await get(gateway, "/console/api/me", "lg-not-a-key-0000")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    status, alice = await get(gateway, "/console/api/me", ALICE_KEY)
    assert status == 200
    assert (alice["user"], alice["admin"], alice["groups"]) == ("alice", False, ["data-science"])
    # Prices of the models her routes reach, so the page can price an answer; ops-only's model is also chat-other's.
    # Each kind's price with its default resolved: an OpenAI model's unpriced cache reads and writes cost the input.
    assert alice["prices"]["gpt-4o-mini"] == {"input": 0.15, "output": 0.60, "cached_input": 0.15,
                                              "cache_write": 0.15, "cache_write_1h": 0.15}
    status, root = await get(gateway, "/console/api/me", ROOT_KEY)
    assert status == 200 and root["admin"] is True


async def test_usage_shows_callers_their_own_requests_and_admins_everyones(gateway) -> None:
    for _ in range(2):
        assert await chat(gateway, ALICE_KEY, "chat-fast") == 200
    for _ in range(3):
        assert await chat(gateway, BOB_KEY, "chat-other") == 200
    assert await chat(gateway, BOB_KEY, "ops-only") == 403
    await flushed(gateway)

    status, alice = await get(gateway, "/console/api/usage", ALICE_KEY, {"since": "1h"})
    assert status == 200 and alice["user"] == "alice"
    assert alice["totals"]["requests"] == 2 and alice["totals"]["errors"] == 0
    assert [row["name"] for row in alice["by_user"]] == ["alice"]
    assert [(row["name"], row["requests"]) for row in alice["by_route"]] == [("chat-fast", 2)]
    assert alice["by_model"][0]["name"] == "up/gpt-4o-mini" and alice["totals"]["cost_usd"] > 0
    assert sum(alice["series"]["requests"]) == 2 and len(alice["series"]["t"]) == len(alice["series"]["requests"])
    assert alice["totals"]["p50_ms"] is not None

    status, refused = await get(gateway, "/console/api/usage", ALICE_KEY, {"since": "1h", "user": "bob"})
    assert status == 403 and refused["error"]["code"] == "not_admin"

    status, everyone = await get(gateway, "/console/api/usage", ROOT_KEY, {"since": "1h"})
    assert status == 200 and everyone["user"] is None
    assert {row["name"]: row["requests"] for row in everyone["by_user"]} == {"alice": 2, "bob": 4}
    assert everyone["totals"]["errors"] == 1
    other = next(row for row in everyone["by_route"] if row["name"] == "chat-other")
    status, bob = await get(gateway, "/console/api/usage", ROOT_KEY, {"since": "1h", "user": "bob"})
    assert status == 200 and bob["totals"]["requests"] == 4
    assert {row["name"]: row["errors"] for row in bob["by_route"]} == {"chat-other": 0, "ops-only": 1}
    assert bob["totals"]["cost_usd"] == pytest.approx(other["cost_usd"]) and other["cost_usd"] > 0


async def test_a_user_name_holding_quotes_reads_exactly_its_own_rows(gateway) -> None:
    assert await chat(gateway, ONEIL_KEY, "chat-fast") == 200
    assert await chat(gateway, ALICE_KEY, "chat-fast") == 200
    await flushed(gateway)
    status, own = await get(gateway, "/console/api/usage", ONEIL_KEY, {"since": "15m"})
    assert status == 200 and own["totals"]["requests"] == 1 and [r["name"] for r in own["by_user"]] == [ONEIL]
    status, viewed = await get(gateway, "/console/api/usage", ROOT_KEY, {"since": "15m", "user": ONEIL})
    assert status == 200 and viewed["totals"]["requests"] == 1


async def test_time_ranges_are_checked(gateway) -> None:
    for params in ({"since": "yesterday"}, {"since": "1h", "until": "2h"}, {"since": "2000-01-01T00:00:00"},
                   {"since": "999999w"}, {"until": "9999-12-31T23:59:59"}):
        status, body = await get(gateway, "/console/api/usage", ALICE_KEY, params)
        assert status == 400 and body["error"]["code"] == "invalid_time_range", params
    status, body = await get(gateway, "/console/api/usage", ALICE_KEY,
                             {"since": "2026-01-01T00:00:00", "until": "2026-01-02T00:00:00"})
    assert status == 200 and body["totals"]["requests"] == 0 and body["bucket_s"] == 900
    assert body["totals"]["p99_ms"] is None and len(body["series"]["t"]) == 97


async def test_governance_is_refused_to_callers_and_shows_admins_grants_limits_and_findings(gateway) -> None:
    assert await chat(gateway, ALICE_KEY, "chat-fast") == 200
    assert await chat(gateway, ALICE_KEY, "chat-guarded", "mail me at jane@example.com") == 400
    assert await chat(gateway, ALICE_KEY, "chat-limited") == 200
    assert await chat(gateway, ALICE_KEY, "chat-limited") == 429
    await flushed(gateway)
    for key in (ALICE_KEY, BOB_KEY):
        status, body = await get(gateway, "/console/api/governance", key)
        assert status == 403 and body["error"]["code"] == "not_admin"

    status, report = await get(gateway, "/console/api/governance", ROOT_KEY, {"since": "1h"})
    assert status == 200
    explained = {entry["user"]: entry["text"] for entry in report["explained"]}
    assert "caller (via group data-science): routes chat-*" in explained["alice"]
    assert "denied: ops-only" in explained["alice"] and "admin API: yes" in explained["root"]
    scopes = {entry["scope"]: entry for entry in report["limits"]}
    # A refused request takes nothing from the window.
    hourly = scopes["user:alice"]["windows"][0]
    assert (hourly["limit"], hourly["used"], hourly["remaining"]) == (1000, 3, 997)
    limited = scopes["key:alice-laptop"]["windows"][0]
    assert (limited["routes"], limited["remaining"]) == (["chat-limited"], 0)
    budget = scopes["user:alice"]["budgets"][0]
    assert budget["usd"] == 5 and 0 < budget["spent_usd"] < 0.01
    assert "user:bob" in scopes and scopes["user:bob"]["windows"][0]["used"] == 0
    assert report["findings"] == [{"direction": "input", "entity": "EMAIL_ADDRESS", "action": "block",
                                   "findings": 1, "requests": 1}]


async def test_without_an_inference_table_usage_says_so_and_governance_still_answers(gateway_without_table) -> None:
    status, body = await get(gateway_without_table, "/console/api/usage", ALICE_KEY)
    assert status == 503 and body["error"]["code"] == "inference_table_unavailable"
    status, report = await get(gateway_without_table, "/console/api/governance", ROOT_KEY)
    assert status == 200 and report["findings"] is None and "not enabled" in report["findings_error"]
    assert report["explained"]
