"""Relaying an upstream stream to the client chunk by chunk, as server-sent events."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from gateway.api.doors import StreamEncoder
from gateway.api.wire import call_function, tool_call_deltas
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.governance import TextTally
from gateway.guarding import ChunkGuard, failure, note_findings, violation
from gateway.inference.transcript import Transcript
from gateway.providers import ChunkStream, UpstreamError, Usage
from gateway.providers.sse import DONE, event
from gateway.routing.upstream import upstream_failure
from guardrails import GuardrailError

log = logging.getLogger("lockgate")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class RelayOptions:
    client_wants_usage: bool
    headers: dict[str, str]
    scan: ChunkGuard | None
    collect: bool
    # None: chunks go out as OpenAI chunks; otherwise the door's own events (Responses, Anthropic Messages).
    encoder: StreamEncoder | None = None


async def relay(request: web.Request, stream: ChunkStream, ex: Exchange, options: RelayOptions) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **options.headers})
    field = "content" if ex.op == "chat" else "text"
    encoder = options.encoder
    transcript = Transcript(field) if options.collect else None
    # Without a transcript, the answer's text is tallied in case the stream ends without usage and must be counted.
    tally = TextTally() if transcript is None else None
    scan = options.scan
    pending: list[bytes] = []
    # The upstream's own event bytes go out as they came when nothing here may change a chunk.
    last = stream.last_event if scan is None and encoder is None else None
    opened = time.perf_counter()
    try:
        await response.prepare(request)
        if encoder is not None:
            pending.extend(encoder.start())
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
                    if last is not None:
                        last.data = None
            if scan is not None and not await scan.filter(chunk):
                raise violation(scan.message)
            if transcript is not None:
                transcript.add(chunk)
            elif tally is not None and (choices := chunk.get("choices")):
                # The chunk nearly every stream is made of: one choice's delta holding only its text.
                if (len(choices) == 1 and type(choice := choices[0]) is dict and type(delta := choice.get("delta"))
                        is dict and len(delta) == 1 and type(content := delta.get("content")) is str):
                    tally.add(content)
                else:
                    _tally_texts(choices, field, tally)
            if encoder is None:
                data = last.data if last is not None else None
                # An event of several data lines holds line breaks; only one of a single line passes as it is.
                # find(), not `in`: on bytes, `in` first tries its operand as an integer and formats the TypeError.
                if data is None or data.find(b"\n") >= 0 or data.find(b"\r") >= 0:
                    pending.append(event(chunk))
                else:
                    pending.append(b"data: " + data + b"\n\n")
            else:
                pending.extend(encoder.feed(chunk))
            # Chunks that arrived together leave together: one write instead of one per chunk.
            if not stream.buffered():
                await response.write(b"".join(pending))
                pending.clear()
        if scan is not None:
            rest = await scan.finish()
            if scan.message is not None:
                raise violation(scan.message)
            if rest is not None:
                if transcript is not None:
                    transcript.add(rest)
                if encoder is None:
                    pending.append(event(rest))
                else:
                    pending.extend(encoder.feed(rest))
        if encoder is None:
            pending.append(DONE)
        else:
            pending.extend(encoder.finish())
        await response.write(b"".join(pending))
    except UpstreamError as err:
        await _end_with_error(response, ex, upstream_failure(err), pending, encoder)
    except GuardrailError as exc:
        await _end_with_error(response, ex, failure(exc), pending, encoder)
    except GatewayError as err:
        await _end_with_error(response, ex, err, pending, encoder)
    except ConnectionError:
        ex.status, ex.error_type, ex.error_code = 499, "client_closed", "client_closed_request"
    except Exception:
        if not response.prepared:
            raise
        # The head is sent: whatever failed, the client still gets an error event and a clean end, never a second head.
        log.exception("request %s failed inside the gateway while streaming", ex.request_id)
        await _end_with_error(response, ex, _INTERNAL, pending, encoder)
    finally:
        ex.upstream_s += time.perf_counter() - opened
        await _close_upstream(stream, ex)
        if scan is not None:
            note_findings(ex, scan.findings())
        if transcript is not None:
            ex.response_payload = transcript.payload(ex.usage)
        if ex.usage is None and ex.first_byte_at:
            if tally is not None:
                ex.answer_text, ex.answer_chars = tally.text(), tally.chars
            elif transcript is not None:
                ex.answer_text = transcript.text()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def _tally_texts(choices: list, field: str, tally: TextTally) -> None:
    for choice in choices:
        if type(choice) is not dict:
            continue
        if field == "text":
            text = choice.get("text")
        elif type(delta := choice.get("delta")) is dict:
            text = delta.get("content")
            if type(reasoning := delta.get("reasoning_content") or delta.get("reasoning")) is str:
                tally.add(reasoning)
            for _, call in tool_call_deltas(delta):
                tally.add(call_function(call)[1])
        else:
            continue
        if type(text) is str:
            tally.add(text)


_INTERNAL = GatewayError(500, "The gateway failed while streaming the answer.", "api_error", "internal_error")


async def _close_upstream(stream: ChunkStream, ex: Exchange) -> None:
    try:
        await stream.aclose()
    except Exception:
        log.exception("request %s: closing the upstream stream failed", ex.request_id)


async def _end_with_error(
    response: web.StreamResponse, ex: Exchange, failure: GatewayError, pending: list[bytes],
    encoder: StreamEncoder | None,
) -> None:
    ex.status, ex.error_type, ex.error_code = failure.status, failure.type, failure.code or ""
    pending.extend([event(failure.payload())] if encoder is None else encoder.error(failure))
    with contextlib.suppress(ConnectionError):
        await response.write(b"".join(pending))
