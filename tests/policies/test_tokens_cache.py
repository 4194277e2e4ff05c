"""The parsed copy of tiktoken's ranks, and token limits enforced while (and before) encodings are built."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
import tiktoken
import tiktoken.registry
import tiktoken_ext.openai_public

from policies import tokens, tokens_cache
from policies.tokens import count_prompt_tokens, encoding_for, install_offline_encodings, prepare_encodings
from tests.conftest import ALICE_KEY, policy_text, sdk
from tests.served import start_gateway

TEXT = "Token limits count every prompt, héllo wörld 12345, even <|endoftext|> written as text."
HI = [{"role": "user", "content": "hi there, how are you today?"}]


@pytest.fixture
def fresh_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Nothing built yet in this process, and an empty cache folder: as in a gateway that has just started."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    saved = (dict(tokens._by_model), dict(tokens._builds), dict(tiktoken.registry.ENCODINGS))
    for kept in (tokens._by_model, tokens._builds, tiktoken.registry.ENCODINGS):
        kept.clear()
    yield tmp_path / "cache"
    for kept, before in zip((tokens._by_model, tokens._builds, tiktoken.registry.ENCODINGS), saved, strict=True):
        kept.clear()
        kept.update(before)


def _reference(name: str) -> tiktoken.Encoding:
    """The encoding as tiktoken itself parses it, kept out of its registry."""
    install_offline_encodings()
    return tiktoken.Encoding(**tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]())


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_an_encoding_built_from_the_copy_counts_as_tiktoken_does(fresh_tokens: Path, name: str) -> None:
    install_offline_encodings()
    made = tokens_cache.build_encoding(fresh_tokens, name)
    assert tokens_cache.cache_path(fresh_tokens, name).exists()
    again = tokens_cache.build_encoding(fresh_tokens, name)
    reference = _reference(name)
    assert again._mergeable_ranks == reference._mergeable_ranks
    assert again.encode(TEXT, allowed_special="all") == made.encode(TEXT, allowed_special="all") \
        == reference.encode(TEXT, allowed_special="all")


def _spoil(path: Path, how: str) -> None:
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "one byte changed":
        middle = len(payload) // 2
        path.write_bytes(header + b"\n" + payload[:middle] + bytes([payload[middle] ^ 1]) + payload[middle + 1:])
    elif how == "another tiktoken":
        path.write_bytes(header.replace(tiktoken.__version__.encode(), b"0.0.1") + b"\n" + payload)
    elif how == "garbage":
        path.write_bytes(b"\x00\xff" * 1000)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "one byte changed", "another tiktoken", "garbage", "empty"])
def test_a_damaged_or_foreign_copy_is_ignored_and_made_again(fresh_tokens: Path, how: str) -> None:
    install_offline_encodings()
    tokens_cache.build_encoding(fresh_tokens, "cl100k_base")
    path = tokens_cache.cache_path(fresh_tokens, "cl100k_base")
    good = path.read_bytes()
    _spoil(path, how)
    assert tokens_cache.read_spec(path) is None
    rebuilt = tokens_cache.build_encoding(fresh_tokens, "cl100k_base")
    assert rebuilt.encode_ordinary(TEXT) == _reference("cl100k_base").encode_ordinary(TEXT)
    assert path.read_bytes() == good
    assert tokens_cache.read_spec(path) is not None


def test_a_copy_of_another_encoding_under_this_name_is_not_used(fresh_tokens: Path) -> None:
    install_offline_encodings()
    tokens_cache.build_encoding(fresh_tokens, "cl100k_base")
    tokens_cache.cache_path(fresh_tokens, "cl100k_base").replace(tokens_cache.cache_path(fresh_tokens, "o200k_base"))
    made = tokens_cache.build_encoding(fresh_tokens, "o200k_base")
    assert made.encode_ordinary(TEXT) == _reference("o200k_base").encode_ordinary(TEXT)


def test_a_whole_copy_tiktoken_refuses_is_made_again(fresh_tokens: Path) -> None:
    install_offline_encodings()
    path = tokens_cache.cache_path(fresh_tokens, "cl100k_base")
    tokens_cache.write_spec(path, {"name": "cl100k_base", "pat_str": "(", "mergeable_ranks": {b"a": "zero"},
                                   "special_tokens": {}})
    assert tokens_cache.read_spec(path) is not None
    made = tokens_cache.build_encoding(fresh_tokens, "cl100k_base")
    assert made.encode_ordinary(TEXT) == _reference("cl100k_base").encode_ordinary(TEXT)
    assert tokens_cache.read_spec(path)["mergeable_ranks"] == _reference("cl100k_base")._mergeable_ranks


def test_a_read_only_cache_folder_still_gives_the_encoding(fresh_tokens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_offline_encodings()

    def refuse(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    made = tokens_cache.build_encoding(fresh_tokens, "cl100k_base")
    assert made.encode_ordinary(TEXT) == _reference("cl100k_base").encode_ordinary(TEXT)
    assert not tokens_cache.cache_path(fresh_tokens, "cl100k_base").exists()


class HeldBuild:
    """Holds the build of one encoding until released, so a test sees a request arrive while it is built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.name = name
        self.started = threading.Event()
        self.release = threading.Event()
        real = tokens_cache.build_encoding

        def held(folder: Path, wanted: str) -> tiktoken.Encoding:
            if wanted == name:
                self.started.set()
                assert self.release.wait(60), "the held build was never released"
            return real(folder, wanted)

        monkeypatch.setattr(tokens, "build_encoding", held)


def test_only_the_encoding_most_routes_use_is_built_before_the_policy_goes_live(
        fresh_tokens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldBuild(monkeypatch, "cl100k_base")
    thread = prepare_encodings(["gpt-4o", "claude-haiku-4-5", "text-embedding-3-small", "gpt-4o-mini"])
    assert thread is not None and held.started.wait(60)
    assert tokens.encoding_ready("gpt-4o") and tokens.encoding_ready("claude-haiku-4-5")
    assert not tokens.encoding_ready("text-embedding-3-small")
    held.release.set()
    thread.join(60)
    assert tokens.encoding_ready("text-embedding-3-small")
    assert encoding_for("text-embedding-3-small").name == "cl100k_base"


def test_callers_of_an_encoding_being_built_share_one_build(fresh_tokens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldBuild(monkeypatch, "cl100k_base")
    built: list[tiktoken.Encoding] = []
    callers = [threading.Thread(target=lambda: built.append(encoding_for("gpt-4"))) for _ in range(4)]
    for caller in callers:
        caller.start()
    assert held.started.wait(60)
    held.release.set()
    for caller in callers:
        caller.join(60)
    assert len(built) == 4 and all(encoding is built[0] for encoding in built)
    assert tiktoken.registry.ENCODINGS["cl100k_base"] is built[0]


TWO_ENCODINGS = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-small: {{targets: [{{provider: up, model: gpt-4o}}]}}
  chat-legacy: {{targets: [{{provider: up, model: gpt-4}}]}}
limits:
  - {{scope: user, tokens: 60/hour}}
"""


async def test_a_request_arriving_while_its_encoding_builds_waits_and_is_counted(
        fresh_tokens: Path, monkeypatch: pytest.MonkeyPatch, make_gateway, fake_openai) -> None:
    held = HeldBuild(monkeypatch, "cl100k_base")
    _, upstream = fake_openai
    server = await make_gateway(TWO_ENCODINGS, url=str(upstream.make_url("/v1")))
    assert await asyncio.to_thread(held.started.wait, 60)
    alice = sdk(server)
    # Each over the limit by itself: only a count can refuse it. More of them than the loop's default thread pool
    # holds, and one whose client gives up while it waits.
    waiting = [asyncio.create_task(alice.chat.completions.create(model="chat-legacy", messages=HI * 20))
               for _ in range(10)]
    given_up = asyncio.create_task(alice.chat.completions.create(model="chat-legacy", messages=HI * 20))
    # The loop is not blocked meanwhile: a route whose encoding is built answers.
    assert (await alice.chat.completions.create(model="chat-default", messages=HI)).choices
    assert not any(task.done() for task in waiting)
    given_up.cancel()
    held.release.set()
    for task in waiting:
        with pytest.raises(openai.RateLimitError) as info:
            await task
        assert "token" in info.value.message.lower()
    with pytest.raises(openai.RateLimitError):
        await alice.chat.completions.create(model="chat-legacy", messages=HI * 20)
    assert count_prompt_tokens("gpt-4", "chat", {"messages": HI * 20}) > 60


async def test_a_freshly_started_gateway_counts_its_first_request(tmp_path: Path, fake_openai) -> None:
    _, upstream = fake_openai
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(TWO_ENCODINGS, url=str(upstream.make_url("/v1"))))
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        for start in ("without the parsed copy", "with it"):
            served = await start_gateway(path)
            try:
                client = openai.AsyncOpenAI(base_url=served.make_url("/v1"), api_key=ALICE_KEY, max_retries=0, timeout=60)
                async with client:
                    with pytest.raises(openai.RateLimitError, match=r"(?i)token"):
                        await client.chat.completions.create(model="chat-legacy", messages=HI * 20)
                    with pytest.raises(openai.RateLimitError, match=r"(?i)token"):
                        await client.chat.completions.create(model="chat-default", messages=HI * 20)
            finally:
                served.process.terminate()
                served.process.wait(60)
            assert tokens_cache.cache_path(cache, "cl100k_base").exists(), start
            assert tokens_cache.cache_path(cache, "o200k_base").exists(), start



NO_LIMITS = """
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  chat-legacy: {{targets: [{{provider: up, model: gpt-4}}]}}
"""


async def test_a_stream_whose_first_count_builds_the_encoding_does_not_stall_the_loop(
        fresh_tokens: Path, monkeypatch: pytest.MonkeyPatch, make_gateway, fake_openai) -> None:
    # The Messages door announces a stream's prompt tokens in its first event, token limits or not.
    held = HeldBuild(monkeypatch, "cl100k_base")
    _, upstream = fake_openai
    server = await make_gateway(NO_LIMITS, url=str(upstream.make_url("/v1")))
    body = {"model": "chat-legacy", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {ALICE_KEY}", "anthropic-version": "2023-06-01"}

    async def streamed() -> str:
        async with aiohttp.ClientSession() as session, \
                session.post(server.make_url("/v1/messages"), json=body, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            return await reply.text()

    waiting = asyncio.create_task(streamed())
    assert await asyncio.to_thread(held.started.wait, 60)
    # Counting that stream builds cl100k; meanwhile the loop still answers others.
    assert (await sdk(server).chat.completions.create(model="chat-default", messages=HI)).choices
    assert not waiting.done()
    held.release.set()
    events = await waiting
    assert "message_start" in events and '"input_tokens":' in events.replace(" ", "")
