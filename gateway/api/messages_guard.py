"""Guardrails on Anthropic Messages bodies, on the client's request and on native answers, whole and streamed.

Scanned is every field the model reads or writes as text: `system`, each block's `text`, `title` and `context`,
`tool_use` names and every string of their `input`, `tool_result` and search-result `content` (strings or blocks,
nested), text documents' `data`, citations' `cited_text`, every string of `tools[]`; in answers also `thinking`.
Blocks of types this gateway does not know are scanned the same way, so a new beta's text is not let through unread.
Not scanned: ids, types, signatures, encrypted data (`redacted_thinking`'s among them), base64 and URL sources,
`cache_control`. Thinking blocks a client sends back are the model's own output, signed: they are not scanned as
input (masking one would void its signature); they are scanned, and masked if need be, as output.
"""

from __future__ import annotations

from typing import Any

from gateway.api.wire import sse
from gateway.errors import GatewayError, bad_request
from gateway.exchange import Exchange
from gateway.guarding import RouteGuards, note_findings, violation
from gateway.providers.anthropic_native import NATIVE_EVENT, NativeCompletion, NativeEvent
from guardrails import Direction, Finding, StreamScanner, Unscannable
from guardrails.bodies import MAX_DEPTH, Path, Texts, replace_texts

_OPAQUE = frozenset({"type", "id", "tool_use_id", "signature", "data", "encrypted_content", "encrypted_index",
                     "media_type", "url", "file_id", "cache_control"})
# The streamed text of each delta type.
_STREAMED = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
# The blocks that may open with some of their streamed text, and the delta type the rest of it comes in.
_OPENING = {"text": "text_delta", "thinking": "thinking_delta"}
_TEXTLESS_EVENTS = frozenset({"ping", "message_stop"})


def _too_deep(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Unscannable(f"content blocks nested deeper than {MAX_DEPTH} levels")


def _strings(walk: Texts, value: dict | list, path: Path, depth: int) -> None:
    """Every non-empty string under value, but for those under opaque keys."""
    stack: list[tuple[dict | list, Path, int]] = [(value, path, depth)]
    while stack:
        node, where, level = stack.pop()
        _too_deep(level)
        walk.count(len(node))
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if key in _OPAQUE:
                continue
            if isinstance(child, str):
                if child:
                    walk.add((*where, key), child)
            elif isinstance(child, dict | list):
                stack.append((child, (*where, key), level + 1))


def _content(walk: Texts, content: object, path: Path, output: bool, depth: int) -> None:
    if isinstance(content, str):
        if content:
            walk.add(path, content)
    elif isinstance(content, list):
        _too_deep(depth)
        for i, block in walk.items(content):
            _block(walk, block, (*path, i), output, depth + 1)


def _block(walk: Texts, block: object, path: Path, output: bool, depth: int) -> None:
    if isinstance(block, str):
        if block:
            walk.add(path, block)
        return
    if not isinstance(block, dict):
        return
    if block.get("type") == "thinking" and not output:
        return
    walk.count(len(block))
    for key, value in block.items():
        if value is None or key in _OPAQUE:
            continue
        where = (*path, key)
        if key == "input":
            # A tool's arguments are the client's or the model's own JSON: every string of it, whatever its key.
            walk.text(value, where)
        elif key == "content":
            _content(walk, value, where, output, depth + 1)
        elif key == "source":
            _source(walk, value, where, output, depth + 1)
        elif isinstance(value, str):
            if value:
                walk.add(where, value)
        elif isinstance(value, dict | list):
            _strings(walk, value, where, depth + 1)


def _source(walk: Texts, source: object, path: Path, output: bool, depth: int) -> None:
    """A document's text is in its source; image and file sources are data, not text."""
    if not isinstance(source, dict):
        return
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        walk.add((*path, "data"), source["data"])
    elif source.get("type") == "content":
        _content(walk, source.get("content"), (*path, "content"), output, depth)


def request_texts(body: dict) -> Texts:
    walk = Texts()
    if body.get("system") is not None:
        _content(walk, body["system"], ("system",), False, 0)
    messages = body.get("messages")
    for i, message in walk.items(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("content") is not None:
            _content(walk, message["content"], ("messages", i, "content"), False, 0)
    if body.get("tools") is not None:
        walk.text(body["tools"], ("tools",))
    return walk


def message_texts(message: dict) -> Texts:
    walk = Texts()
    _content(walk, message.get("content"), ("content",), True, 0)
    return walk


async def _scan(guards: RouteGuards, walk: Texts, direction: Direction,
                ex: Exchange | None) -> tuple[dict[Path, str], list[Finding], str | None]:
    """The masked texts by path, the findings, and the block message (None: not blocked)."""
    assert guards.guard is not None
    actions = guards.input if direction == "input" else guards.output
    verdict = await guards.guard.scan_strings([text for _, text in walk.fields], direction, actions.pii,
                                              actions.patterns)
    if ex is not None:
        note_findings(ex, verdict.findings)
    masked = {path: new for (path, old), new in zip(walk.fields, verdict.body, strict=True) if new != old}
    return masked, verdict.findings, verdict.message if verdict.blocked else None


async def check_request(guards: RouteGuards, body: dict, ex: Exchange) -> dict:
    """The Messages request to forward, masked where the route says so (the same object when nothing was); raises on
    a block. GuardrailError propagates: the pipeline answers it as a guardrail failure."""
    try:
        walk = request_texts(body)
    except Unscannable as exc:
        raise bad_request(f"This request cannot pass the route's input guardrails: {exc}.",
                          code="content_not_checkable") from None
    if not walk.fields:
        return body
    masked, _, blocked = await _scan(guards, walk, "input", ex)
    if blocked is not None:
        raise violation(blocked)
    return replace_texts(body, masked)


def _unreadable_answer(exc: Unscannable) -> GatewayError:
    return GatewayError(502, f"The upstream answer cannot pass the route's output guardrails: {exc}.", "api_error",
                        "upstream_invalid_response")


async def check_message(guards: RouteGuards, completion: NativeCompletion, ex: Exchange) -> None:
    """Output guardrails on a whole native message: a block raises, a mask replaces the message (and its chat view)."""
    try:
        walk = message_texts(completion.message)
    except Unscannable as exc:
        raise _unreadable_answer(exc) from None
    if not walk.fields:
        return
    masked, _, blocked = await _scan(guards, walk, "output", ex)
    if blocked is not None:
        raise violation(blocked)
    if masked:
        completion.replace_message(replace_texts(completion.message, masked))


def _put(data: dict, path: Path, text: str) -> None:
    holder: Any = data
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = text


def _chat_text(choice: dict) -> tuple[dict, str] | None:
    """Where the one text of a translated delta chunk's choice sits (see StreamTranslator)."""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return None
    for name in ("content", "reasoning_content"):
        if name in delta:
            return delta, name
    calls = delta.get("tool_calls")
    if calls:
        return calls[0]["function"], "arguments"
    return None


def _chat_piece(template: dict, text: str) -> dict:
    """A chat choice like `template` holding `text` in the same field."""
    delta = template["delta"]
    if "tool_calls" in delta:
        piece: dict = {"tool_calls": [{"index": delta["tool_calls"][0]["index"], "function": {"arguments": text}}]}
    else:
        piece = {name: text for name in ("content", "reasoning_content") if name in delta}
    return {"index": 0, "delta": piece, "logprobs": None, "finish_reason": None}


class NativeStreamGuard:
    """Output guardrails on a native Messages stream, applied to the events the client gets and to their chat view.

    Each content block's streamed text (text, thinking, tool input JSON) has its own scanner, which holds back only
    what could still become a finding; what it holds when the block stops goes out as one more delta of that block,
    just before its content_block_stop. Text anywhere else (a block's opening fields, deltas and events of other
    types) is scanned whole as it comes. Works as the relay's StreamGuard does: filter each chunk, then finish.
    """

    def __init__(self, guards: RouteGuards) -> None:
        assert guards.guard is not None
        self.guard = guards.guard
        self.guards = guards
        self.ner = guards.ner
        # (block index, delta type) -> its scanner, and the last chat choice it fed (the shape for its released rest)
        self.open: dict[tuple[int, str], tuple[StreamScanner, dict | None]] = {}
        self.found: list[Finding] = []
        self.message: str | None = None

    async def filter(self, chunk: dict) -> bool:
        """Masks the chunk's event and chat view in place; False once the stream must end (a block)."""
        event: NativeEvent = chunk[NATIVE_EVENT]
        data = event.data
        kind = event.kind
        try:
            if kind == "content_block_delta":
                await self._delta(chunk, event, data["delta"])
            elif kind == "content_block_stop":
                await self._stop(chunk, event, data["index"])
            elif kind == "content_block_start":
                await self._start(chunk, event, data["content_block"])
            elif kind == "message_start":
                if isinstance(message := data.get("message"), dict):
                    await self._whole(event, message_texts(message), ("message",))
            elif kind not in _TEXTLESS_EVENTS:
                walk = Texts()
                _strings(walk, data, (), 0)
                await self._whole(event, walk)
        except Unscannable as exc:
            raise _unreadable_answer(exc) from None
        return self.message is None

    async def _start(self, chunk: dict, event: NativeEvent, block: dict) -> None:
        kind = block["type"]
        opening = _OPENING.get(kind)
        if opening is not None:
            # A text or thinking block may open with some of its text: the first piece of what its deltas add to.
            await self._stream_text(chunk, event, (event.data["index"], opening), block, kind)
        walk = Texts()
        _block(walk, {key: value for key, value in block.items() if key != kind} if opening else block,
               ("content_block",), True, 0)
        await self._whole(event, walk)
        calls = chunk["choices"][0]["delta"].get("tool_calls") if chunk.get("choices") else None
        if calls and walk.fields:
            # What the client got masked, the transcript keeps masked.
            calls[0]["function"]["name"] = block.get("name")

    async def _delta(self, chunk: dict, event: NativeEvent, delta: dict) -> None:
        kind = delta["type"]
        field = _STREAMED.get(kind)
        if field is None:
            walk = Texts()
            _strings(walk, delta, ("delta",), 0)
            await self._whole(event, walk)
            return
        await self._stream_text(chunk, event, (event.data["index"], kind), delta, field)
        if len(delta) > 1 + (field in delta) and self.message is None:
            # A delta holds its type and its text; anything else in it is read whole.
            walk = Texts()
            _strings(walk, {key: value for key, value in delta.items() if key != field}, ("delta",), 0)
            await self._whole(event, walk)

    async def _stream_text(self, chunk: dict, event: NativeEvent, key: tuple[int, str], holder: dict,
                           field: str) -> None:
        """Feeds `holder[field]`, a piece of a block's streamed text, to the block's scanner; puts back what may go."""
        text = holder.get(field)
        if not isinstance(text, str) or not text:
            return
        previous = self.open.get(key)
        scanner = previous[0] if previous is not None else StreamScanner(self.guard, self.guards.output.pii,
                                                                         self.guards.output.patterns)
        out = await scanner.afeed(text) if self.ner else scanner.feed(text)
        if scanner.blocked:
            self.found.extend(scanner.findings)
            self.open.pop(key, None)
            self.message = scanner.message
            return
        choice = chunk["choices"][0] if chunk.get("choices") else None
        self.open[key] = (scanner, choice if choice is not None or previous is None else previous[1])
        if out != text:
            holder[field] = out
            event.raw = None
            place = _chat_text(choice) if choice is not None else None
            if place is not None:
                place[0][place[1]] = out

    async def _stop(self, chunk: dict, event: NativeEvent, index: int) -> None:
        for key in [key for key in self.open if key[0] == index]:
            scanner, template = self.open.pop(key)
            rest = await scanner.afinish() if self.ner else scanner.finish()
            self.found.extend(scanner.findings)
            if scanner.blocked:
                self.message = scanner.message
                return
            if rest:
                delta = {"type": key[1], _STREAMED[key[1]]: rest}
                event.before.append(sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                "delta": delta}))
                if template is not None:
                    chunk.setdefault("choices", []).append(_chat_piece(template, rest))

    async def _whole(self, event: NativeEvent, walk: Texts, prefix: Path = ()) -> None:
        if not walk.fields:
            return
        masked, findings, blocked = await _scan(self.guards, walk, "output", None)
        self.found.extend(findings)
        if blocked is not None:
            self.message = blocked
            return
        for path, text in masked.items():
            _put(event.data, (*prefix, *path), text)
            event.raw = None

    async def finish(self) -> dict | None:
        """Nothing is left to release: every block's rest went out before its stop, and the stream ends after them."""
        return None

    def findings(self) -> list[Finding]:
        return self.found + [finding for scanner, _ in self.open.values() for finding in scanner.findings]
