"""The console in a real browser: Debian's chromium driven by Playwright, against a real gateway and fake upstreams.

Every test ends by checking that the page raised no JavaScript error and logged no console error (a CSP violation
is one) other than the refused requests it meant to make. LOCKGATE_SCREENSHOTS=FOLDER saves a PNG of each page.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright, expect

from gateway.app import create_app
from tests.conftest import ALICE_KEY as EMBEDDED_KEY
from tests.conftest import policy_text
from tests.console.conftest import ALICE_KEY, BOB_KEY, HOSTILE_WORDS, ROOT_KEY, chat, console_policy, flushed
from tests.fakes.openai_upstream import WORDS, FakeOpenAI
from tests.served import Served, start_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("LOCKGATE_SCREENSHOTS")
VIEWPORT = {"width": 1000, "height": 700}
ANSWER = "".join(WORDS)
# Slow enough that a half-streamed answer is on screen for a while, whatever the machine's load.
CHUNK_DELAY_S = 0.25
expect.set_options(timeout=30_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # Root in a container has no user namespaces for chromium's sandbox.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestServer]:
    upstream = TestServer(FakeOpenAI(chunk_delay_s=CHUNK_DELAY_S).app())
    hostile = TestServer(FakeOpenAI(words=HOSTILE_WORDS).app())
    await upstream.start_server()
    await hostile.start_server()
    folder = tmp_path_factory.mktemp("console")
    server = TestServer(create_app(console_policy(folder, str(upstream.make_url("/v1")), str(hostile.make_url("/v1")))))
    await server.start_server()
    yield server
    await server.close()
    await hostile.close()
    await upstream.close()


@dataclass
class Console:
    page: Page
    base: str
    problems: list[str] = field(default_factory=list)

    async def sign_in(self, key: str) -> None:
        await self.page.goto(f"{self.base}/console")
        await self.page.get_by_label("API key").fill(key)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_role("button", name="Sign out")).to_be_visible()

    def panels(self) -> Locator:
        return self.page.locator("[data-role=panel]")

    async def send(self, message: str) -> None:
        await self.page.get_by_label("Message").fill(message)
        await self.page.get_by_role("button", name="Send").click()

    async def screenshot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))

    def assert_no_errors(self, refused: tuple[int, ...] = ()) -> None:
        """No JavaScript error, and no console error but the refusals (status codes) the test caused on purpose."""
        expected = re.compile(r"console: Failed to load resource: the server responded with a status of "
                              rf"({'|'.join(map(str, refused)) or 'none'})\b")
        assert [problem for problem in self.problems if not expected.match(problem)] == []


async def _open(browser: Browser, base: str) -> tuple[Console, BrowserContext]:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    console = Console(page, base)
    page.on("pageerror", lambda error: console.problems.append(f"pageerror: {error}"))
    page.on("console", lambda message: console.problems.append(f"console: {message.text}")
            if message.type == "error" else None)
    return console, context


@pytest_asyncio.fixture(loop_scope="module")
async def console(browser: Browser, gateway: TestServer) -> AsyncIterator[Console]:
    opened, context = await _open(browser, str(gateway.make_url("")).rstrip("/"))
    yield opened
    await context.close()


def _ms(text: str) -> float:
    return float(text.removesuffix(" ms").replace(",", ""))


async def test_sign_in_then_stream_an_answer_with_its_figures(console: Console) -> None:
    page = console.page
    await page.goto(f"{console.base}/console")
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    await console.screenshot("sign-in")
    await page.get_by_label("API key").fill("lg-not-a-key-0000")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#signin-error")).to_contain_text("not accepted")
    await console.sign_in(ALICE_KEY)
    await expect(page.locator("#who")).to_have_text("alice")
    await expect(page.get_by_role("link", name="Governance")).to_be_hidden()
    # The key stays in this tab's session storage: no cookie, nothing in the address.
    assert await page.evaluate("sessionStorage.getItem('lockgate.console.key')") == ALICE_KEY
    assert await page.context.cookies() == [] and ALICE_KEY not in page.url
    options = await console.panels().first.locator("select option").all_text_contents()
    assert options == ["chat-fast", "chat-other", "chat-html", "chat-guarded", "chat-limited"]

    await page.get_by_label("System prompt").fill("Be brief.")
    await page.get_by_label("Temperature").fill("0.2")
    await page.get_by_label("Max tokens").fill("64")
    await console.send("Say hello")
    answer = console.panels().first.locator("[data-role=answer]")
    # Part of the answer is on screen before the rest has been generated.
    await page.wait_for_function("() => { const text = document.querySelector('[data-role=answer]').textContent;"
                                 " return text.startsWith('Hello') && !text.endsWith('.'); }")
    await expect(answer).to_have_text(ANSWER)
    figures = console.panels().first.locator("[data-role=figures]")
    await expect(figures.locator("[data-figure=tokens]")).to_have_text(re.compile(r"^\d+ / 6$"))
    await expect(figures.locator("[data-figure=cost]")).to_have_text(re.compile(r"^\$0\.0000\d\d$"))
    ttft = _ms(await figures.locator("[data-figure=ttft]").inner_text())
    latency = _ms(await figures.locator("[data-figure=latency]").inner_text())
    assert 0 < ttft < latency and latency >= 5 * CHUNK_DELAY_S * 1000 * 0.9
    await console.screenshot("playground")
    console.assert_no_errors(refused=(401,))


async def test_compare_streams_two_routes_side_by_side(console: Console) -> None:
    page = console.page
    await console.sign_in(ALICE_KEY)
    await page.get_by_role("button", name="Compare").click()
    await expect(console.panels()).to_have_count(2)
    await console.panels().nth(0).locator("select").select_option("chat-fast")
    await console.panels().nth(1).locator("select").select_option("chat-other")
    await page.get_by_role("button", name="Add a route").click()
    await expect(console.panels()).to_have_count(3)
    await console.panels().nth(2).get_by_role("button", name="Remove").click()
    await expect(console.panels()).to_have_count(2)
    await console.send("Compare yourselves")
    # Both answers are under way at once: the two streams run in parallel.
    await page.wait_for_function("() => [...document.querySelectorAll('[data-role=answer]')].every("
                                 "a => a.textContent.startsWith('Hello') && !a.textContent.endsWith('.'))")
    for panel in (console.panels().nth(0), console.panels().nth(1)):
        await expect(panel.locator("[data-role=answer]")).to_have_text(ANSWER)
        await expect(panel.locator("[data-figure=tokens]")).to_have_text(re.compile(r"^\d+ / 6$"))
    costs = [await console.panels().nth(i).locator("[data-figure=cost]").inner_text() for i in (0, 1)]
    # gpt-4o costs more than gpt-4o-mini for the same tokens.
    assert float(costs[1].lstrip("$")) > float(costs[0].lstrip("$")) > 0
    await console.screenshot("compare")
    console.assert_no_errors()


async def test_guardrail_refusals_and_rate_limits_are_shown_as_what_they_are(console: Console) -> None:
    await console.sign_in(ALICE_KEY)
    panel = console.panels().first
    await panel.locator("select").select_option("chat-guarded")
    await console.send("Write to me at jane@example.com")
    outcome = panel.locator("[data-role=outcome]")
    await expect(outcome).to_contain_text("Blocked by a guardrail (400)")
    await expect(outcome).to_contain_text("EMAIL_ADDRESS")
    await panel.locator("select").select_option("chat-limited")
    await console.send("Once")
    await expect(panel.locator("[data-role=answer]")).to_have_text(ANSWER)
    await expect(outcome).to_be_hidden()
    await console.send("Twice")
    await expect(outcome).to_contain_text("Rate limited (429)")
    await expect(outcome).to_contain_text(re.compile(r"Retry after \d+ s\."))
    assert (await outcome.inner_text()).count("Retry after") == 1
    await expect(panel.locator("[data-role=answer]")).to_be_empty()
    await console.screenshot("refusals")
    console.assert_no_errors(refused=(400, 429))


async def test_an_answer_holding_html_is_shown_as_text(console: Console) -> None:
    page = console.page
    await console.sign_in(ALICE_KEY)
    panel = console.panels().first
    await panel.locator("select").select_option("chat-html")
    await console.send("Answer with <b>markup</b>")
    answer = panel.locator("[data-role=answer]")
    await expect(answer).to_have_text("".join(HOSTILE_WORDS))
    assert await answer.locator("*").count() == 0
    assert await page.evaluate("window.pwned") is None
    console.assert_no_errors()


async def test_usage_shows_callers_their_own_requests_and_admins_everyones(console: Console,
                                                                          gateway: TestServer) -> None:
    for route in ("chat-fast", "chat-fast", "chat-other"):
        assert await chat(gateway, BOB_KEY, route) == 200
    assert await chat(gateway, BOB_KEY, "ops-only") == 403
    assert await chat(gateway, ALICE_KEY, "chat-other") == 200
    await flushed(gateway)
    page = console.page
    await console.sign_in(BOB_KEY)
    await page.get_by_role("link", name="Usage").click()
    await expect(page.locator("#usage-scope")).to_have_text("Requests of bob")
    by_route = page.locator("#usage-by-route tbody tr")
    await expect(by_route).to_have_count(3)
    await expect(by_route.nth(0).locator("td").nth(0)).to_have_text("chat-fast")
    await expect(by_route.nth(0).locator("td").nth(1)).to_have_text("2")
    ops = page.locator("#usage-by-route tbody tr", has_text="ops-only")
    await expect(ops.locator("td").nth(2)).to_have_text("1")
    await expect(page.locator("#usage-by-user tbody tr td:first-child")).to_have_text(["bob"])
    await expect(page.locator(".total", has_text="Requests").locator(".value")).to_have_text("4")
    for name in ("requests", "tokens", "cost", "latency"):
        await expect(page.locator(f"#chart-{name} canvas")).to_have_count(1)
    await expect(page.get_by_label("User")).to_be_hidden()

    await page.get_by_role("button", name="Sign out").click()
    await console.sign_in(ROOT_KEY)
    await page.get_by_role("link", name="Usage").click()
    await expect(page.locator("#usage-scope")).to_have_text("Everyone's requests (admin)")
    users = page.locator("#usage-by-user tbody tr td:first-child")
    await expect(users.filter(has_text="bob")).to_have_count(1)
    await expect(users.filter(has_text="alice")).to_have_count(1)
    await page.get_by_label("Time range").select_option("1h")
    await page.get_by_label("User").fill("bob")
    await page.get_by_role("button", name="Refresh").click()
    await expect(page.locator("#usage-scope")).to_have_text("Requests of bob")
    await page.get_by_label("User").fill("")
    await page.get_by_label("Time range").select_option("15m")
    await expect(page.locator("#usage-scope")).to_have_text("Everyone's requests (admin)")
    await console.screenshot("usage")
    console.assert_no_errors()


async def test_governance_for_an_admin_and_refused_to_a_caller(console: Console, gateway: TestServer) -> None:
    assert await chat(gateway, ALICE_KEY, "chat-guarded", "my mail is jane@example.com") == 400
    await flushed(gateway)
    page = console.page
    await console.sign_in(ROOT_KEY)
    await page.get_by_role("link", name="Governance").click()
    explain = page.locator("#governance-explain pre")
    await expect(explain.filter(has_text="user alice")).to_contain_text("caller (via group data-science): routes chat-*")
    await expect(explain.filter(has_text="user root")).to_contain_text("admin API: yes")
    limits = page.locator("#governance-limits tbody tr")
    await expect(limits.filter(has_text="user:alice").filter(has_text="requests per hour")).to_have_count(1)
    await expect(limits.filter(has_text="user:alice").filter(has_text="USD per day")).to_have_count(1)
    await expect(limits.filter(has_text="key:alice-laptop")).to_contain_text("chat-limited")
    findings = page.locator("#governance-findings tbody tr", has_text="EMAIL_ADDRESS")
    await expect(findings).to_contain_text("block")
    await console.screenshot("governance")
    console.assert_no_errors()

    await page.get_by_role("button", name="Sign out").click()
    await console.sign_in(ALICE_KEY)
    await expect(page.get_by_role("link", name="Governance")).to_be_hidden()
    # The link is hidden, but the server is what refuses: going there anyway gets its 403.
    await page.goto(f"{console.base}/console#governance")
    await expect(page.locator("#governance-error")).to_have_text(
        "The gateway refused: This part of the console needs the admin capability. (403 not_admin)")
    await expect(page.locator("#governance-explain")).to_have_count(0)
    console.assert_no_errors(refused=(403,))


EMBEDDED_POLICY = """
providers:
  local:
    type: embedded
    model: "{model}"
    engine: {{max_model_len: 1024, max_num_seqs: 2}}
routes:
  chat-small: {{targets: [{{provider: local}}]}}
inference_table: {{enabled: false}}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedded_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    from runtime import prepare_model

    path = tmp_path_factory.mktemp("console-embedded") / "policy.yaml"
    path.write_text(policy_text(EMBEDDED_POLICY, model=str(prepare_model("smollm2-135m-instruct"))))
    served = await start_gateway(path, ready_timeout_s=300)
    yield served
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=60)


@pytest.mark.runtime
async def test_stream_an_answer_from_the_embedded_model(browser: Browser, embedded_gateway: Served) -> None:
    console, context = await _open(browser, embedded_gateway.make_url(""))
    try:
        page = console.page
        await console.sign_in(EMBEDDED_KEY)
        await page.get_by_label("Temperature").fill("0")
        await page.get_by_label("Max tokens").fill("30")
        await console.send("What is the capital of France?")
        panel = console.panels().first
        await expect(panel.locator("[data-role=answer]")).to_contain_text("Paris", timeout=120_000)
        await expect(panel.locator("[data-figure=tokens]")).to_have_text(re.compile(r"^\d+ / \d+$"), timeout=120_000)
        # The embedded model has no price: the page says so rather than inventing a cost.
        await expect(panel.locator("[data-figure=cost]")).to_have_text("no price")
        console.assert_no_errors()
    finally:
        await context.close()
