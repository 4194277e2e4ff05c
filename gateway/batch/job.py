"""The line engine of batches: each line through the whole governance pipeline as its submitter, a bounded number at
once per route, a line refused by a rate limit retried until the batch expires. The Batch API's runner and `lockgate
batch run` both drive it; what they do with each result (files, progress) is theirs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import orjson

from gateway import metrics
from gateway.api.doors import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Door
from gateway.compiled import CompiledPolicy
from gateway.context import Gateway
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.providers.base import Usage
from gateway.proxy import answer_line
from policies.keys import Principal

log = logging.getLogger("lockgate.batch")

DOORS: dict[str, Door] = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS,
                          "/v1/responses": RESPONSES}
MAX_CUSTOM_ID_CHARS = 512
# Refusals that pass with time: the line waits and tries again. A budget refusal does not pass within a batch.
_WAIT_CODES = frozenset({"rate_limit_exceeded", "limiter_unavailable"})
_BUDGET_CODE = "budget_exceeded"
# The longest one wait lasts whatever Retry-After says, so a cancel or an expiry is seen in time.
_MAX_WAIT_S = 30.0
_POLL_S = 0.25
# In-flight lines a cancel lets finish before it cuts them off.
CANCEL_GRACE_S = 2.0
# The semaphore of lines whose model names no route: they fail in the pipeline, a few at a time.
_NO_ROUTE_CONCURRENCY = 8


class LineError(Exception):
    """An input line the batch cannot run: an item of OpenAI's `errors.data` on the failed batch."""

    def __init__(self, code: str, message: str, line: int, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line, self.param = code, message, line, param

    def item(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class Line:
    custom_id: str
    url: str
    body: dict


@dataclass(slots=True)
class LineResult:
    custom_id: str
    request_id: str
    status_code: int | None
    body: dict | None
    error: dict | None
    cost_micro_usd: int = 0
    # The tokens the gateway counted for the line (the upstream's usage, or its estimate); not part of the file line.
    usage: Usage | None = None

    @property
    def failed(self) -> bool:
        return self.status_code is None or self.status_code >= 400

    def to_line(self) -> bytes:
        """One line of the output or error file, as OpenAI writes it: a refused request is an HTTP answer with its
        error body; `error` is for a line that got no answer at all (expired)."""
        response = (None if self.status_code is None else
                    {"status_code": self.status_code, "request_id": self.request_id, "body": self.body})
        return orjson.dumps({"id": f"batch_req_{self.request_id.replace('-', '')}", "custom_id": self.custom_id,
                             "response": response, "error": self.error}) + b"\n"


def parse_line(raw: bytes, number: int, endpoint: str | None) -> Line:
    """One input line (1-based `number`), checked as OpenAI checks it; `endpoint` is the batch's (None: any door)."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise LineError("invalid_json_line", "This line is not parseable as valid JSON.", number) from None
    if not isinstance(item, dict):
        raise LineError("invalid_json_line", "This line must be a JSON object.", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_required_parameter", "The line needs a non-empty string 'custom_id'.", number,
                        "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise LineError("invalid_value", f"'custom_id' is longer than {MAX_CUSTOM_ID_CHARS} characters.", number,
                        "custom_id")
    if item.get("method") != "POST":
        raise LineError("invalid_value", "'method' must be \"POST\".", number, "method")
    url = item.get("url")
    if url not in DOORS:
        raise LineError("invalid_url", f"'url' must be one of {', '.join(DOORS)}.", number, "url")
    if endpoint is not None and url != endpoint:
        raise LineError("url_mismatch", f"The line's url {url} is not the batch's endpoint {endpoint}.", number, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError("missing_required_parameter", "The line needs a JSON object 'body'.", number, "body")
    return Line(custom_id, url, body)


class Slots:
    """How many lines may be in flight on each route, over every batch of this process (the route's
    `batch.concurrency`, or one figure for all: `lockgate batch run --concurrency`)."""

    def __init__(self, override: int | None = None) -> None:
        self._override = override
        self._routes: dict[str, tuple[int, asyncio.Semaphore]] = {}

    def for_route(self, route: str, policy: CompiledPolicy) -> asyncio.Semaphore:
        compiled = policy.routes.get(route)
        size = self._override or (compiled.config.batch.concurrency if compiled is not None else _NO_ROUTE_CONCURRENCY)
        held = self._routes.get(route)
        if held is None or held[0] != size:
            # A reload that changes the figure takes effect for lines that start from now on.
            held = (size, asyncio.Semaphore(size))
            self._routes[route] = held
        return held[1]


@dataclass(slots=True)
class _Run:
    gateway: Gateway
    principal: Principal
    batch_id: str
    expires_at: float
    budget_refusal: GatewayError | None = None


async def run_job(gateway: Gateway, principal: Principal, lines: Iterable[Line], done: set[str], *, slots: Slots,
                  batch_id: str, expires_at: float, cancelled: Callable[[], bool],
                  emit: Callable[[LineResult], None]) -> None:
    """Runs every line whose custom_id is not in `done`, calling `emit` once per finished line; returns when all have
    a result, or soon after `cancelled()` turns true (lines not finished by then get none)."""
    run = _Run(gateway, principal, batch_id, expires_at)
    in_flight: set[asyncio.Task[None]] = set()
    try:
        for line in _remaining(lines, done):
            if cancelled():
                break
            policy = gateway.policy
            model = line.body.get("model")
            slot = slots.for_route(model if isinstance(model, str) else "", policy)
            if not await _acquire(slot, cancelled):
                break
            task = asyncio.get_running_loop().create_task(_run_line(run, line, cancelled, emit))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            task.add_done_callback(lambda _, held=slot: held.release())
        while in_flight and not cancelled():
            await asyncio.wait(in_flight, timeout=_POLL_S)
        if in_flight:
            await asyncio.wait(in_flight, timeout=CANCEL_GRACE_S)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


def _remaining(lines: Iterable[Line], done: set[str]) -> Iterator[Line]:
    return (line for line in lines if line.custom_id not in done)


async def _acquire(slot: asyncio.Semaphore, cancelled: Callable[[], bool]) -> bool:
    """A seat on the route; False when the batch was cancelled while it waited."""
    while not cancelled():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL_S):
                await slot.acquire()
                return True
    return False


async def _run_line(run: _Run, line: Line, cancelled: Callable[[], bool], emit: Callable[[LineResult], None]) -> None:
    door = DOORS[line.url]
    while True:
        gateway = run.gateway
        policy = gateway.policy
        ex = Exchange(door.endpoint, op=door.op, policy_version=policy.version)
        ex.metadata["batch_id"] = run.batch_id
        ex.metadata["custom_id"] = line.custom_id
        if run.budget_refusal is not None:
            err = run.budget_refusal
            ex.key_id, ex.user, ex.groups = run.principal.key_id, run.principal.user, run.principal.groups
            ex.ratelimit_outcome = f"refused:{_BUDGET_CODE}"
            result = _refused(ex, err)
        elif time.time() >= run.expires_at:
            emit(_expired(line, ex))
            return
        else:
            route = policy.routes.get(str(line.body.get("model")))
            priority = route.config.batch.priority if route is not None else 0
            try:
                # The pipeline may mask the body in place; a retry must start from what the line said.
                answer = await answer_line(gateway, policy, run.principal, door, dict(line.body), ex, priority)
                result = LineResult(line.custom_id, ex.request_id, 200, orjson.loads(answer), None)
            except GatewayError as err:
                if err.code in _WAIT_CODES and not cancelled():
                    wait = _retry_wait_s(err)
                    if time.time() + wait >= run.expires_at:
                        emit(_expired(line, ex))
                        return
                    await asyncio.sleep(wait)
                    continue
                if err.code == _BUDGET_CODE:
                    run.budget_refusal = err
                result = _refused(ex, err)
            except Exception:
                log.exception("batch %s line %s failed inside the gateway", run.batch_id, line.custom_id)
                err = GatewayError(500, "The gateway failed to handle the request.", "api_error", "internal_error")
                result = _refused(ex, err)
        result.cost_micro_usd = ex.cost_micro_usd
        result.usage = ex.usage
        finished = time.perf_counter()
        metrics.observe_request(ex.route or "-", door.endpoint, ex.status, finished - ex.started)
        gateway.record(ex, finished, policy)
        emit(result)
        return


def _refused(ex: Exchange, err: GatewayError) -> LineResult:
    ex.status, ex.error_type, ex.error_code = err.status, err.type, err.code or ""
    metrics.count_error(err.code or err.type, err.status)
    return LineResult(ex.metadata["custom_id"], ex.request_id, err.status, err.payload(), None)


def _expired(line: Line, ex: Exchange) -> LineResult:
    """A line the batch's window closed on before it could run: no answer, no row (nothing was sent)."""
    return LineResult(line.custom_id, ex.request_id, None, None,
                      {"code": "batch_expired", "message": "This request could not be executed before the completion "
                       "window expired."})


def _retry_wait_s(err: GatewayError) -> float:
    """How long a line refused by a rate limit waits before it tries again: the refusal's Retry-After, bounded."""
    try:
        wait = float(err.headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, _POLL_S), _MAX_WAIT_S)
