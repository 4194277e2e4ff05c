"""Every text-bearing field of OpenAI-shaped bodies, in and out, and copy-on-write rewriting of them.

Scanned is whatever the model reads or writes as text. Chat requests: `messages[].content` (a string, or
parts: the `text` and `refusal` strings of any part, whatever its `type`), `name`, `refusal`,
`reasoning_content`, `reasoning`, `audio.transcript`, `tool_calls[].function.name` and `.arguments`, the
legacy `function_call`; every string of `tools[]` and legacy `functions[]` (names, descriptions, the
parameters' JSON schema); `response_format.json_schema`; `prediction.content`. Completions `prompt` and
`suffix`, embeddings `input`: strings, and token ids read with the route's tokenizer. Answers: the same
message fields under `choices[].message`, `choices[].text`, and the tokens of `choices[].logprobs`.
Function names are scanned too: a card number fits in one (a masked name makes the call fail: it fails closed).
Not scanned: ids, roles, types and other enumerations, JSON keys, URLs and base64 data (images, audio,
files), sampling parameters, `user` and `metadata` (the inference table masks those apart).

The walk is bounded (fields, visited nodes, depth): a body beyond the bounds is Unscannable, never half-checked.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

Op = Literal["chat", "completions", "embeddings"]
Path = tuple[str | int, ...]

MAX_TEXT_FIELDS = 10_000
MAX_NODES = 200_000
MAX_DEPTH = 64
_MESSAGE_TEXTS = frozenset({"name", "refusal", "reasoning_content", "reasoning"})
_PART_TEXTS = ("text", "refusal")
_CHAT_EXTRAS = frozenset({"tools", "functions", "response_format", "prediction"})
_TOKEN_ERRORS = (TypeError, ValueError, KeyError, OverflowError)


class Unscannable(ValueError):
    """The body holds text the guardrails cannot read (token ids without a tokenizer, or beyond the walk's bounds)."""


class Tokenizer(Protocol):
    def decode(self, tokens: list[int]) -> str: ...

    def encode_ordinary(self, text: str) -> list[int]: ...


class _Malformed(Exception):
    pass


class Texts:
    """The scanned strings of one body, gathered by walking it, and what a rewrite must do besides replacing them."""

    __slots__ = ("fields", "logprobs", "malformed", "nodes", "tokenized", "tokenizer")

    def __init__(self, fields: list[tuple[Path, str]] | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.fields: list[tuple[Path, str]] = fields if fields is not None else []
        self.tokenizer = tokenizer
        self.nodes = 0
        # Created when first needed, so the common body pays for none of them.
        # Paths whose text was read from token ids: their masked text goes back as token ids.
        self.tokenized: dict[Path, Tokenizer] | None = None
        # A choice's path and its logprobs' path: the logprobs are dropped when anything in the choice is masked,
        # since their tokens spell the unmasked text.
        self.logprobs: dict[Path, Path] | None = None
        # Logprobs not in the documented shape: dropped whenever the guardrails may change or stop the text.
        self.malformed: list[Path] | None = None

    def add(self, path: Path, text: str) -> None:
        fields = self.fields
        if len(fields) >= MAX_TEXT_FIELDS:
            raise Unscannable(f"more than {MAX_TEXT_FIELDS} text fields")
        fields.append((path, text))

    def count(self, nodes: int) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise Unscannable(f"more than {MAX_NODES} values to walk")

    def items(self, values: list[Any]) -> enumerate[Any]:
        self.count(len(values))
        return enumerate(values)

    def text(self, value: Any, path: Path) -> None:
        """A text field: a string, or every string inside whatever stands in its place."""
        if isinstance(value, str):
            self.add(path, value)
        elif isinstance(value, dict | list):
            self.leaves(value, path)

    def leaves(self, value: dict | list, path: Path) -> None:
        stack: list[tuple[Any, Path]] = [(value, path)]
        while stack:
            node, where = stack.pop()
            if len(where) - len(path) > MAX_DEPTH:
                raise Unscannable(f"text nested deeper than {MAX_DEPTH} levels")
            self.count(len(node))
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                if isinstance(child, str):
                    self.add((*where, key), child)
                elif isinstance(child, dict | list):
                    stack.append((child, (*where, key)))

    def content(self, content: Any, path: Path) -> None:
        if isinstance(content, str):
            self.add(path, content)
        elif isinstance(content, list):
            for i, part in self.items(content):
                if isinstance(part, str):
                    self.add((*path, i), part)
                elif isinstance(part, dict):
                    self.part(part, (*path, i))
        elif isinstance(content, dict):
            self.part(content, path)

    def part(self, part: dict, path: Path) -> None:
        for key in _PART_TEXTS:
            value = part.get(key)
            if value is not None:
                self.text(value, (*path, key))

    def message(self, message: dict, path: Path) -> None:
        # Only the keys present are visited: most messages have two, and this runs for every message of every request.
        for key, value in message.items():
            if value is None or key == "role":
                continue
            if key == "content":
                self.content(value, (*path, "content"))
            elif key in _MESSAGE_TEXTS:
                self.text(value, (*path, key))
            elif key == "tool_calls":
                if isinstance(value, list):
                    for j, call in self.items(value):
                        if isinstance(call, dict) and call.get("function") is not None:
                            self.function_call(call["function"], (*path, "tool_calls", j, "function"))
            elif key == "function_call":
                self.function_call(value, (*path, "function_call"))
            elif key == "audio" and isinstance(value, dict) and value.get("transcript") is not None:
                self.text(value["transcript"], (*path, "audio", "transcript"))

    def function_call(self, function: Any, path: Path) -> None:
        if not isinstance(function, dict):
            self.text(function, path)
            return
        for key in ("name", "arguments"):
            value = function.get(key)
            if value is not None:
                self.text(value, (*path, key))

    def prompt(self, value: Any, path: Path) -> None:
        """Completions prompts and embeddings inputs: a string, strings, token ids, or lists of token ids."""
        if isinstance(value, str):
            self.add(path, value)
        elif isinstance(value, list) and value:
            if isinstance(value[0], int):
                self.tokens(value, path)
                return
            for i, item in self.items(value):
                if isinstance(item, str):
                    self.add((*path, i), item)
                elif isinstance(item, list):
                    self.tokens(item, (*path, i))
                elif isinstance(item, int):
                    raise Unscannable("a prompt mixes token ids with text")
                elif isinstance(item, dict):
                    self.leaves(item, (*path, i))

    def tokens(self, tokens: list[Any], path: Path) -> None:
        if not tokens:
            return
        if self.tokenizer is None:
            raise Unscannable("token ids cannot be read as text for this route's models; send the text instead")
        try:
            text = self.tokenizer.decode(tokens)
        except Unscannable:
            raise
        except _TOKEN_ERRORS:
            raise Unscannable("the prompt holds values that are not token ids of this route's models") from None
        self.add(path, text)
        if self.tokenized is None:
            self.tokenized = {}
        self.tokenized[path] = self.tokenizer

    def choice_logprobs(self, choice: dict, path: Path, chat: bool) -> None:
        logprobs = choice.get("logprobs")
        if logprobs is None:
            return
        where = (*path, "logprobs")
        if self.logprobs is None:
            self.logprobs = {}
        self.logprobs[path] = where
        try:
            spelled = self._chat_logprobs(logprobs, choice) if chat else self._completion_logprobs(logprobs, choice)
        except _Malformed:
            self.malformed = [*(self.malformed or ()), where]
            return
        if spelled:
            self.add(where, spelled)

    def _chat_logprobs(self, logprobs: Any, choice: dict) -> str:
        if not isinstance(logprobs, dict):
            raise _Malformed
        message = choice.get("message")
        said = message if isinstance(message, dict) else {}
        spelled: list[str] = []
        for key in ("content", "refusal"):
            entries = logprobs.get(key)
            if entries is None:
                continue
            if not isinstance(entries, list):
                raise _Malformed
            chosen: list[str] = []
            for _, entry in self.items(entries):
                chosen.append(_entry_token(entry, spelled))
                alternatives = entry.get("top_logprobs")
                if alternatives is None:
                    continue
                if not isinstance(alternatives, list):
                    raise _Malformed
                for _, alternative in self.items(alternatives):
                    spelled.append(_entry_token(alternative, spelled))
            joined = "".join(chosen)
            # The usual case: the tokens spell the text already scanned, so they are not scanned twice.
            if joined != said.get(key):
                spelled.append(joined)
        return "\n".join(spelled)

    def _completion_logprobs(self, logprobs: Any, choice: dict) -> str:
        if not isinstance(logprobs, dict):
            raise _Malformed
        tokens = logprobs.get("tokens")
        spelled: list[str] = []
        if tokens is not None:
            if not isinstance(tokens, list) or not all(isinstance(t, str) for _, t in self.items(tokens)):
                raise _Malformed
            joined = "".join(tokens)
            if joined != choice.get("text"):
                spelled.append(joined)
        alternatives = logprobs.get("top_logprobs")
        if alternatives is not None:
            if not isinstance(alternatives, list):
                raise _Malformed
            for _, options in self.items(alternatives):
                if options is None:
                    continue
                if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
                    raise _Malformed
                self.count(len(options))
                spelled.extend(options)
        return "\n".join(spelled)


def _entry_token(entry: Any, spelled: list[str]) -> str:
    """The token of a chat logprobs entry; its bytes join the scanned text when they spell something else."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise _Malformed
    token: str = entry["token"]
    raw = entry.get("bytes")
    if raw is not None:
        if not isinstance(raw, list):
            raise _Malformed
        try:
            decoded = bytes(raw).decode("utf-8", "replace")
        except (TypeError, ValueError):
            raise _Malformed from None
        if decoded != token:
            spelled.append(decoded)
    return token


def _chat_extras(walk: Texts, body: dict[str, Any]) -> None:
    """The chat request's text besides its messages."""
    for key in ("tools", "functions"):
        if body.get(key) is not None:
            walk.text(body[key], (key,))
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("json_schema") is not None:
        walk.text(response_format["json_schema"], ("response_format", "json_schema"))
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        walk.content(prediction.get("content"), ("prediction", "content"))


def request_texts(body: dict[str, Any], op: Op, tokenizer: Tokenizer | None = None) -> Texts:
    walk = Texts(tokenizer=tokenizer)
    if op == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            for i, message in walk.items(messages):
                if isinstance(message, dict):
                    walk.message(message, ("messages", i))
                else:
                    walk.text(message, ("messages", i))
        if not _CHAT_EXTRAS.isdisjoint(body):
            _chat_extras(walk, body)
    elif op == "completions":
        walk.prompt(body.get("prompt"), ("prompt",))
        if body.get("suffix") is not None:
            walk.text(body["suffix"], ("suffix",))
    elif op == "embeddings":
        walk.prompt(body.get("input"), ("input",))
    else:
        raise ValueError(f"unknown operation {op!r}")
    return walk


def response_texts(body: dict[str, Any], op: Op) -> Texts:
    walk = Texts()
    if op == "embeddings":
        return walk
    if op not in ("chat", "completions"):
        raise ValueError(f"unknown operation {op!r}")
    choices = body.get("choices")
    for i, choice in walk.items(choices if isinstance(choices, list) else []):
        if not isinstance(choice, dict):
            continue
        path = ("choices", i)
        message = choice.get("message")
        if isinstance(message, dict):
            walk.message(message, (*path, "message"))
        if choice.get("text") is not None:
            walk.text(choice["text"], (*path, "text"))
        walk.choice_logprobs(choice, path, op == "chat")
    return walk


def rewrite(body: dict[str, Any], texts: Texts, masked: dict[Path, str], drop_malformed: bool) -> dict[str, Any]:
    """The body with these masked texts put back (as token ids where they came as such) and unsafe logprobs dropped."""
    if not masked and not (drop_malformed and texts.malformed):
        return body
    replacements: dict[Path, Any] = {}
    for path, text in masked.items():
        tokenizer = texts.tokenized.get(path) if texts.tokenized else None
        replacements[path] = text if tokenizer is None else tokenizer.encode_ordinary(text)
    if texts.logprobs:
        for path in masked:
            dropped = texts.logprobs.get(path[:2])
            if dropped is not None:
                replacements[dropped] = None
    if drop_malformed and texts.malformed:
        for path in texts.malformed:
            replacements[path] = None
    return replace_texts(body, replacements)


def replace_texts(body: dict[str, Any], replacements: dict[Path, Any]) -> dict[str, Any]:
    """A copy of body with these values replaced; containers off the replaced paths are shared."""
    if not replacements:
        return body
    copies: dict[Path, Any] = {(): dict(body)}
    for path, value in replacements.items():
        parent = copies[()]
        for depth, step in enumerate(path[:-1], start=1):
            prefix = path[:depth]
            if prefix not in copies:
                child = parent[step]
                copies[prefix] = dict(child) if isinstance(child, dict) else list(child)
                parent[step] = copies[prefix]
            parent = copies[prefix]
        parent[path[-1]] = value
    return copies[()]
