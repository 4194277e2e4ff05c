"""Where the scanned text lives in OpenAI-shaped bodies, and copy-on-write replacement of it.

Only message text is scanned: chat `messages[].content` (strings and `text` parts), completions
`prompt`, embeddings `input` strings; in responses `choices[].message.content` and `choices[].text`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

Op = Literal["chat", "completions", "embeddings"]
Path = tuple[str | int, ...]


def request_texts(body: dict[str, Any], op: Op) -> Iterator[tuple[Path, str]]:
    if op == "chat":
        messages = body.get("messages")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            if isinstance(message, dict):
                yield from _content_texts(message.get("content"), ("messages", i, "content"))
    elif op == "completions":
        yield from _strings(body.get("prompt"), ("prompt",))
    elif op == "embeddings":
        yield from _strings(body.get("input"), ("input",))
    else:
        raise ValueError(f"unknown operation {op!r}")


def response_texts(body: dict[str, Any], op: Op) -> Iterator[tuple[Path, str]]:
    if op == "embeddings":
        return
    if op not in ("chat", "completions"):
        raise ValueError(f"unknown operation {op!r}")
    choices = body.get("choices")
    for i, choice in enumerate(choices if isinstance(choices, list) else ()):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield ("choices", i, "message", "content"), message["content"]
        if isinstance(choice.get("text"), str):
            yield ("choices", i, "text"), choice["text"]


def replace_texts(body: dict[str, Any], replacements: dict[Path, str]) -> dict[str, Any]:
    """A copy of body with these strings replaced; containers off the replaced paths are shared."""
    if not replacements:
        return body
    copies: dict[Path, Any] = {(): dict(body)}
    for path, text in replacements.items():
        parent = copies[()]
        for depth, step in enumerate(path[:-1], start=1):
            prefix = path[:depth]
            if prefix not in copies:
                child = parent[step]
                copies[prefix] = dict(child) if isinstance(child, dict) else list(child)
                parent[step] = copies[prefix]
            parent = copies[prefix]
        parent[path[-1]] = text
    return copies[()]


def _content_texts(content: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(content, str):
        yield path, content
    elif isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                yield (*path, i, "text"), part["text"]


def _strings(value: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield (*path, i), item
