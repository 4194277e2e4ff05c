"""`lockgate batch run` as a user runs it (a subprocess) against a fake OpenAI upstream: results, refusals,
interruption and resume, and input it refuses before touching anything."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.conftest import ALICE_KEY, BOB_KEY, policy_text
from tests.fakes.identity_provider import AUDIENCE, ISSUER, IdentityProvider
from tests.fakes.openai_upstream import FakeOpenAI

ROOT = Path(__file__).resolve().parents[3]
ROUTE = "chat-default"

POLICY = """
roles:
  chatter: {{models: ["chat-*"]}}
bindings:
  - {{user: alice, role: chatter}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default:
    targets: [{{provider: up, model: gpt-4o-mini}}]
    guardrails: {{input: {{patterns: block}}}}
    batch: {{concurrency: 4}}
guardrails:
  patterns:
    - {{name: project-codename, regex: "\\\\bBLUEBIRD-\\\\d+\\\\b"}}
prices:
  gpt-4o-mini: {{input: 1000, output: 2000}}
"""


class SlowOpenAI(FakeOpenAI):
    """Each answer takes `delay_s`, so a run lasts long enough to be interrupted mid-way."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay_s)
        return await super().chat(request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay_s)
        return await super().completions(request)

    def custom_ids(self) -> Counter[str]:
        """How often each line reached the upstream: every prompt names its line."""
        return Counter(_prompt(body).split()[-1] for _, body, _ in self.requests)


def _prompt(body: dict) -> str:
    return body["messages"][0]["content"] if "messages" in body else body["prompt"]


def batch_line(custom_id: str, text: str | None = None, url: str = "/v1/chat/completions") -> bytes:
    text = text or f"Please summarise line {custom_id}"
    body = {"model": "ignored", "messages": [{"role": "user", "content": text}]} if url == "/v1/chat/completions" \
        else {"model": "ignored", "prompt": text, "max_tokens": 8}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + b"\n"


def results(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


@pytest.fixture
async def upstream(aiohttp_server) -> tuple[SlowOpenAI, str]:
    fake = SlowOpenAI(delay_s=0.0)
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("/v1"))


@pytest.fixture
def policy(tmp_path: Path, upstream: tuple[SlowOpenAI, str]) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(POLICY, url=upstream[1]))
    return path


async def start(policy: Path, input_path: Path, out: Path, *extra: str, key: str | None = ALICE_KEY,
                route: str = ROUTE) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_API_KEY"}
    if key is not None:
        env["LOCKGATE_API_KEY"] = key
    # The loop keeps serving the fake upstream while the command runs.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "batch", "run", str(input_path), "--route", route, "--out", str(out),
        "--policy", str(policy), *extra, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def batch_run(*args: object, **options: object) -> tuple[int, str]:
    process = await start(*args, **options)  # type: ignore[arg-type]
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stderr.decode(errors="replace")


async def test_every_line_gets_its_result_and_a_guarded_line_its_error(policy: Path, upstream, tmp_path: Path) -> None:
    fake, _ = upstream
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [batch_line(f"c{i}") for i in range(12)] + [batch_line(f"p{i}", url="/v1/completions") for i in range(4)]
    lines.append(batch_line("secret", "What is BLUEBIRD-7 about? secret"))
    input_path.write_bytes(b"".join(lines) + b"\n")

    code, stderr = await batch_run(policy, input_path, out)

    assert code == 0, stderr
    by_id = {row["custom_id"]: row for row in results(out)}
    assert len(by_id) == len(results(out)) == 17
    for custom_id, row in by_id.items():
        if custom_id == "secret":
            continue
        assert row["error"] is None and row["response"]["status_code"] == 200, row
        assert row["id"].startswith("batch_req_") and row["response"]["request_id"]
        answer = row["response"]["body"]
        assert answer["choices"][0]["message" if custom_id.startswith("c") else "text"]
    refused = by_id["secret"]["response"]
    assert refused["status_code"] == 400
    assert refused["body"]["error"]["code"] == "content_policy_violation"
    # The refused line never left the gateway; every other one went to the route's target, once.
    assert fake.custom_ids() == Counter({f"c{i}": 1 for i in range(12)} | {f"p{i}": 1 for i in range(4)})
    assert {body["model"] for _, body, _ in fake.requests} == {"gpt-4o-mini"}
    assert "17 of 17 lines have a result" in stderr and "1 of the 17 run now failed" in stderr
    # 16 answers at a price of 1000/2000 USD per 1M tokens: well over a cent.
    cost = float(stderr.rsplit("cost $", 1)[1].split()[0])
    assert cost > 0.01


_ROWS = ("import sys\nfrom gateway.inference import connect\nclient = connect('chdb://' + sys.argv[1])\n"
         "rows = client.query(\"SELECT metadata['custom_id'], metadata['batch_id'], status FROM lockgate.inference\")\n"
         "print(orjson.dumps(rows.result_rows).decode())\nclient.close()\n")


async def test_each_line_leaves_one_inference_row_with_its_batch(upstream, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    table = f'inference_table: {{enabled: true, clickhouse: "chdb://{tmp_path / "chdb"}", flush_interval_ms: 50}}\n'
    policy.write_text(policy_text(POLICY, url=upstream[1]) + table)
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(batch_line("l0") + batch_line("l1") + batch_line("guarded", "BLUEBIRD-1 guarded"))

    code, stderr = await batch_run(policy, input_path, out)

    assert code == 0, stderr
    # Read by a process of its own, now that the command (which held the folder) has exited.
    read = await asyncio.create_subprocess_exec(sys.executable, "-c", "import orjson\n" + _ROWS, str(tmp_path / "chdb"),
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, read_err = await asyncio.wait_for(read.communicate(), 120)
    assert read.returncode == 0, read_err.decode()[-4000:]
    rows = sorted(map(tuple, orjson.loads(stdout)))
    batch_ids = {row[1] for row in rows}
    assert [(row[0], row[2]) for row in rows] == [("guarded", 400), ("l0", 200), ("l1", 200)]
    assert len(batch_ids) == 1 and batch_ids.pop().startswith("batch_")


async def test_a_user_without_the_route_gets_each_line_refused(policy: Path, upstream, tmp_path: Path) -> None:
    fake, _ = upstream
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(b"".join(batch_line(f"l{i}") for i in range(5)))

    code, stderr = await batch_run(policy, input_path, out, key=BOB_KEY)

    assert code == 0, stderr
    rows = results(out)
    assert sorted(row["custom_id"] for row in rows) == [f"l{i}" for i in range(5)]
    assert {(row["response"]["status_code"], row["response"]["body"]["error"]["code"]) for row in rows} == {
        (403, "model_not_permitted")}
    assert fake.requests == []
    assert "5 of the 5 run now failed" in stderr


async def _wait_for_results(out: Path, count: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(600):
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        assert process.returncode is None, "the command ended before it was interrupted"
        await asyncio.sleep(0.05)
    raise AssertionError(f"{out} never reached {count} results")


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
async def test_an_interrupted_run_finishes_on_rerun_with_each_line_once(policy: Path, upstream, tmp_path: Path,
                                                                        how: signal.Signals) -> None:
    fake, _ = upstream
    fake.delay_s = 0.1
    total, concurrency = 80, 4
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(b"".join(batch_line(f"l{i}") for i in range(total)))

    process = await start(policy, input_path, out, "--concurrency", str(concurrency))
    await _wait_for_results(out, 10, process)
    process.send_signal(how)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    first = {row["custom_id"] for row in results(out)}
    assert 10 <= len(first) < total
    if how == signal.SIGINT:
        assert process.returncode == 130, stderr.decode()
        assert b"run the same command again" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
        # A write the kill cut short: the rerun must cut it away, not choke on it or keep it.
        with out.open("ab") as file:
            file.write(b'{"id":"batch_req_0","custom_id":"l7')

    code, stderr_again = await batch_run(policy, input_path, out, "--concurrency", str(concurrency))

    assert code == 0, stderr_again
    ids = Counter(row["custom_id"] for row in results(out))
    assert ids == Counter({f"l{i}": 1 for i in range(total)})
    reached = fake.custom_ids()
    assert set(reached) == set(ids)
    assert all(reached[custom_id] == 1 for custom_id in first), "a line answered before the interruption ran again"
    # Only lines in flight when it stopped (their answers never written) can have reached the upstream twice.
    assert sum(count > 1 for count in reached.values()) <= concurrency
    assert f"{total} of {total} lines have a result" in stderr_again
    finished = out.read_bytes()

    code, stderr_done = await batch_run(policy, input_path, out)

    assert code == 0 and f"all {total} lines already have a result" in stderr_done
    assert out.read_bytes() == finished and fake.custom_ids() == reached


async def test_progress_is_a_plain_line_every_few_seconds_off_a_terminal(policy: Path, upstream, tmp_path: Path) -> None:
    fake, _ = upstream
    fake.delay_s = 0.1
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(b"".join(batch_line(f"l{i}") for i in range(70)))

    code, stderr = await batch_run(policy, input_path, out, "--concurrency", "1")

    assert code == 0, stderr
    progress = [line for line in stderr.splitlines() if re.fullmatch(
        r"\d+/70 done, 0 failed, [\d.]+ lines/s, ETA \d+ s, cost \$[\d.]+", line)]
    assert progress, stderr
    assert "\r" not in stderr and "#" not in stderr
    done, _, rest = progress[0].partition("/")
    assert 0 < int(done) < 70 and float(rest.split("cost $")[1]) > 0


BAD_INPUTS = {
    "not json": (b'{"custom_id": "a", "method": "POST"', ":2: This line is not parseable as valid JSON"),
    "duplicate": (batch_line("l0").rstrip(), ":2: custom_id 'l0' appears more than once"),
    "bad url": (b'{"custom_id": "x", "method": "POST", "url": "/v1/images", "body": {}}', ":2: 'url' must be one of"),
    "no body": (b'{"custom_id": "x", "method": "POST", "url": "/v1/completions"}', ":2: The line needs a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_a_bad_input_file_is_refused_and_nothing_is_touched(policy: Path, upstream, tmp_path: Path,
                                                                  case: str) -> None:
    fake, _ = upstream
    second, message = BAD_INPUTS[case]
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(batch_line("l0") + second + b"\n" + batch_line("l9"))
    # An earlier run's results, with a torn last line a real run would cut away.
    before = batch_line("earlier") + b'{"custom_id": "torn'
    out.write_bytes(before)

    code, stderr = await batch_run(policy, input_path, out)

    assert code == 2
    assert f"{input_path}{message}" in stderr
    assert out.read_bytes() == before
    assert fake.requests == []


@pytest.mark.parametrize(("options", "message"), [
    ({"key": "lg-not-a-key-of-this-policy"}, "the API key is not one of the policy's keys"),
    ({"key": None}, "no API key: set LOCKGATE_API_KEY or pass --key"),
    ({"route": "chat-nope"}, "unknown route 'chat-nope': the policy's routes are chat-default"),
])
async def test_a_bad_key_or_route_is_refused_and_nothing_is_touched(policy: Path, upstream, tmp_path: Path,
                                                                    options: dict, message: str) -> None:
    fake, _ = upstream
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(batch_line("l0"))

    code, stderr = await batch_run(policy, input_path, out, **options)

    assert code == 2
    assert message in stderr
    assert "lg-not-a-key" not in stderr
    assert not out.exists()
    assert fake.requests == []


async def test_a_missing_input_file_is_refused(policy: Path, tmp_path: Path) -> None:
    code, stderr = await batch_run(policy, tmp_path / "absent.jsonl", tmp_path / "out.jsonl")

    assert code == 2
    assert f"cannot read {tmp_path / 'absent.jsonl'}: No such file or directory" in stderr
    assert not (tmp_path / "out.jsonl").exists()


async def test_a_resumed_run_keeps_the_batch_id_of_the_first(upstream, tmp_path: Path) -> None:
    fake, url = upstream
    fake.delay_s = 0.1
    policy = tmp_path / "policy.yaml"
    table = f'inference_table: {{enabled: true, clickhouse: "chdb://{tmp_path / "chdb"}", flush_interval_ms: 50}}\n'
    policy.write_text(policy_text(POLICY, url=url) + table)
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(b"".join(batch_line(f"l{i}") for i in range(40)))
    kept = tmp_path / "out.jsonl.lockgate"

    process = await start(policy, input_path, out, "--concurrency", "2")
    await _wait_for_results(out, 6, process)
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 60) == 130
    batch_id = orjson.loads(kept.read_bytes())["batch_id"]
    assert re.fullmatch(r"batch_[0-9a-f]{32}", batch_id)

    code, stderr = await batch_run(policy, input_path, out, "--concurrency", "2")

    assert code == 0, stderr
    assert orjson.loads(kept.read_bytes())["batch_id"] == batch_id
    read = await asyncio.create_subprocess_exec(sys.executable, "-c", "import orjson\n" + _ROWS, str(tmp_path / "chdb"),
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, read_err = await asyncio.wait_for(read.communicate(), 120)
    assert read.returncode == 0, read_err.decode()[-4000:]
    rows = orjson.loads(stdout)
    # The interrupted run's rows and the resumed run's: one id.
    assert {row[1] for row in rows} == {batch_id}
    assert {row[0] for row in rows} == {f"l{i}" for i in range(40)}

    # A new OUT is a new run: the id left next to a deleted OUT is not reused.
    out.unlink()
    code, stderr = await batch_run(policy, input_path, out)
    assert code == 0, stderr
    assert orjson.loads(kept.read_bytes())["batch_id"] != batch_id


class StalledIdentityProvider(IdentityProvider):
    """Its keys never come: the command is still starting (it cannot check the token) when it is interrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    async def _jwks(self, request: web.Request) -> web.Response:
        self.asked.set()
        await asyncio.sleep(3600)
        return await super()._jwks(request)


# The keys wait up to 60 s, so the start is still waiting for them when the Ctrl-C comes, however busy the machine:
# with the default 5 s, a Ctrl-C the command was slow to see let the fetch time out first (exit 2 instead of 130).
JWT_POLICY = """
auth:
  jwt: {{jwks_url: "{jwks}", issuer: "{issuer}", audience: "{audience}", jwks_timeout_s: 60}}
roles:
  chatter: {{models: ["chat-*"]}}
bindings:
  - {{group: ml-team, role: chatter}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
"""


async def test_a_ctrl_c_while_the_command_starts_exits_130_with_one_line(aiohttp_server, upstream,
                                                                         tmp_path: Path) -> None:
    fake, url = upstream
    provider = StalledIdentityProvider()
    idp = await aiohttp_server(provider.app())
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(JWT_POLICY, url=url, jwks=str(idp.make_url("/jwks.json")), issuer=ISSUER,
                                  audience=AUDIENCE))
    input_path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(batch_line("l0"))

    process = await start(policy, input_path, out, key=provider.token("carol", ["ml-team"]))
    await asyncio.wait_for(provider.asked.wait(), 120)
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)

    text = stderr.decode(errors="replace")
    assert process.returncode == 130, text
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if line.startswith("lockgate batch run:")] == [
        f"lockgate batch run: interrupted; run the same command again to finish {out}"]
    assert fake.requests == [] and not out.exists()
