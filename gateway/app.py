"""The application factory: routes in one place, one middleware, a cleanup context per resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway import telemetry
from gateway.api.cors import install_cors
from gateway.api.files import BATCH_STORE
from gateway.api.routes import add_routes
from gateway.api.signin import SIGN_IN, SignIn
from gateway.batch.runner import BatchRunner
from gateway.batch.store import BatchStore
from gateway.compiled import ProviderPool
from gateway.context import GATEWAY, Gateway
from gateway.errors import GatewayError
from gateway.inference import InferenceWriter
from gateway.metrics import LOOP_LAG_WATCH
from gateway.state import PolicyHolder, file_stamp
from policies.loader import load_policy
from policies.schema import ServerConfig
from policies.tokens import install_offline_encodings

log = logging.getLogger("lockgate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The listener's settings come from the policy the gateway started with: a reload cannot rebind a socket.
SERVER_CONFIG: web.AppKey[ServerConfig] = web.AppKey("server_config", ServerConfig)
# The longest a stop waits for queued spans to reach the collector.
TRACE_FLUSH_S = 5.0


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything outside the proxy pipeline also answers in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = f"{request.method} {request.path}: {exc.reason}"
        return GatewayError(exc.status, message, "invalid_request_error", code).response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return GatewayError(500, "The gateway failed to handle the request.", "api_error", "internal_error").response()


def flush_reserve_s(shutdown_timeout_s: float) -> float:
    """The part of the stop deadline kept for writing the last rows; in-flight requests get the rest."""
    return min(5.0, shutdown_timeout_s / 3)


def create_app(policy_path: str | os.PathLike[str], run_batches: bool = True) -> web.Application:
    """Builds the gateway for one policy file, read now; its providers and engines start with the app. `run_batches`
    False: this process runs no Batch API batches (`lockgate batch run` drives its own lines)."""
    stamp = file_stamp(policy_path)
    initial = load_policy(policy_path)
    server = initial.policy.server
    pool = ProviderPool(retire_after_s=server.shutdown_timeout_s + 5)
    holder = PolicyHolder(policy_path, pool)
    app = web.Application(middlewares=[openai_errors], client_max_size=server.max_request_bytes)
    if server.cors.allow_origins:
        install_cors(app, server.cors)
    app[GATEWAY] = Gateway(holder)
    app[SERVER_CONFIG] = server
    app[SIGN_IN] = SignIn()
    app[BATCH_STORE] = BatchStore(Path(initial.policy.batch.data_dir))

    async def policy_and_providers(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(install_offline_encodings)
        await holder.activate_initial(initial, stamp)
        watcher = asyncio.get_running_loop().create_task(holder.watch(server.watch_interval_s))
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await pool.close()
        await holder.stores.close()

    def time_left() -> float:
        """What remains of the stop's one deadline (set when the stop began; the whole timeout if none was)."""
        deadline = app[GATEWAY].stop_deadline
        return server.shutdown_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.0)

    async def shadow_traffic(app: web.Application) -> AsyncIterator[None]:
        yield
        # Cleaned up before the providers (cleanup runs in reverse), so running shadows can still finish; they get
        # the drain's share of what is left, never the writer's.
        await app[GATEWAY].resilience.shadows.close(max(time_left() - flush_reserve_s(server.shutdown_timeout_s), 0.0))

    async def inference_writer(app: web.Application) -> AsyncIterator[None]:
        config = initial.policy.inference_table
        if not config.enabled:
            yield
            return
        writer = InferenceWriter.from_config(config)
        writer.start()
        app[GATEWAY].writer = writer
        yield
        gateway = app[GATEWAY]
        try:
            await asyncio.wait_for(gateway.drain_masking(), time_left())
        except TimeoutError:
            log.error("%d records were still being masked at the stop deadline and are lost", len(gateway.masking))
        gateway.submit_waiting()
        gateway.writer = None
        # In a thread: close() waits for the last batch to be written or spooled.
        await asyncio.to_thread(writer.close, time_left())

    async def identity_provider_keys(app: web.Application) -> AsyncIterator[None]:
        current = holder.current
        assert current is not None
        config = current.loaded.policy.auth.jwt
        if config is not None:
            await app[SIGN_IN].prepare(current, config.jwks_timeout_s)
        yield
        await app[SIGN_IN].close()

    async def traces(app: web.Application) -> AsyncIterator[None]:
        config = initial.policy.telemetry
        if config.otlp_endpoint is None:
            yield
            return
        tracing = await asyncio.to_thread(telemetry.Tracing, config)
        telemetry.TRACING = tracing
        yield
        telemetry.TRACING = None
        # Cleaned up last (after the rows were written): what the deadline leaves, within a bound of its own.
        await tracing.close(min(time_left(), TRACE_FLUSH_S))

    async def loop_lag(app: web.Application) -> AsyncIterator[None]:
        watch = asyncio.get_running_loop().create_task(LOOP_LAG_WATCH.run())
        yield
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch

    async def batch_runner(app: web.Application) -> AsyncIterator[None]:
        # Started last, stopped first: its lines need the policy, the providers and the inference writer.
        runner = BatchRunner(app[GATEWAY], app[BATCH_STORE])
        runner.start()
        yield
        await runner.close()

    app.cleanup_ctx.append(traces)
    app.cleanup_ctx.append(loop_lag)
    app.cleanup_ctx.append(inference_writer)
    app.cleanup_ctx.append(policy_and_providers)
    app.cleanup_ctx.append(identity_provider_keys)
    app.cleanup_ctx.append(shadow_traffic)
    if run_batches:
        app.cleanup_ctx.append(batch_runner)
    add_routes(app)
    return app
