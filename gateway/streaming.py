"""Relaying an upstream stream to the client chunk by chunk, as server-sent events."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.guarding import StreamGuard, failure, note_findings, violation
from gateway.providers import ChunkStream, UpstreamError, Usage
from gateway.sse import DONE, event
from gateway.routing.upstream import upstream_failure
from guardrails import GuardrailError

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class RelayOptions:
    client_wants_usage: bool
    headers: dict[str, str]
    scan: StreamGuard | None
    collect: bool


class _Transcript:
    """The streamed answer put back together, for the inference table."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str] = {}

    def add(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index") or 0)
            holder = choice.get("delta") if self.field == "content" else choice
            text = holder.get(self.field) if isinstance(holder, dict) else None
            if isinstance(text, str) and text:
                self.texts.setdefault(index, []).append(text)
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]

    def payload(self, usage: Usage | None) -> dict:
        """Shaped like the whole answer would have been, so the same masking applies to it."""
        choices = []
        for i in sorted(set(self.texts) | set(self.finish)):
            text = "".join(self.texts.get(i, []))
            content = {"message": {"role": "assistant", "content": text}} if self.field == "content" else {"text": text}
            choices.append({"index": i, **content, "finish_reason": self.finish.get(i)})
        return {"streamed": True, "choices": choices,
                "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                                     "completion_tokens": usage.completion_tokens}}


async def relay(request: web.Request, stream: ChunkStream, ex: Exchange, options: RelayOptions) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **options.headers})
    field = "content" if ex.endpoint == "chat" else "text"
    transcript = _Transcript(field) if options.collect else None
    scan = options.scan
    pending: list[bytes] = []
    opened = time.perf_counter()
    try:
        await response.prepare(request)
        async for chunk in stream:
            if not ex.first_byte_at:
                ex.first_byte_at = time.perf_counter()
            if "usage" in chunk:
                usage = chunk["usage"]
                if usage:
                    ex.usage = Usage.from_openai(usage)
                if not options.client_wants_usage:
                    if not chunk.get("choices"):
                        continue
                    del chunk["usage"]
            if scan is not None and not await scan.filter(chunk):
                raise violation(scan.message)
            if transcript is not None:
                transcript.add(chunk)
            pending.append(event(chunk))
            # Chunks that arrived together leave together: one write instead of one per chunk.
            if not stream.buffered():
                await response.write(b"".join(pending))
                pending.clear()
        if scan is not None:
            rest = await scan.finish()
            if scan.message is not None:
                raise violation(scan.message)
            if rest:
                pending.append(event({"object": "chat.completion.chunk" if field == "content" else
                                      "text_completion", "choices": [_rest_choice(field, rest)]}))
        pending.append(DONE)
        await response.write(b"".join(pending))
    except UpstreamError as err:
        await _end_with_error(response, ex, upstream_failure(err), pending)
    except GuardrailError as exc:
        await _end_with_error(response, ex, failure(exc), pending)
    except GatewayError as err:
        await _end_with_error(response, ex, err, pending)
    except ConnectionError:
        ex.status, ex.error_type, ex.error_code = 499, "client_closed", "client_closed_request"
    finally:
        ex.upstream_s += time.perf_counter() - opened
        await stream.aclose()
        if scan is not None:
            note_findings(ex, scan.findings())
        if transcript is not None:
            ex.response_payload = transcript.payload(ex.usage)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def _rest_choice(field: str, text: str) -> dict:
    if field == "content":
        return {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return {"index": 0, "text": text, "finish_reason": None}


async def _end_with_error(
    response: web.StreamResponse, ex: Exchange, failure: GatewayError, pending: list[bytes]
) -> None:
    ex.status, ex.error_type, ex.error_code = failure.status, failure.type, failure.code or ""
    with contextlib.suppress(ConnectionError):
        await response.write(b"".join(pending) + event(failure.payload()))
