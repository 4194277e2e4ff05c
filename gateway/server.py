"""A worker: the gateway's app on its port, alone or as one of N sharing the port under gateway.supervisor."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import uvloop
from aiohttp import web

from gateway.api.connections import ClientLimits, GatewayRunner
from gateway.app import SERVER_CONFIG, create_app, flush_reserve_s
from gateway.context import GATEWAY
from gateway.metrics import record_frozen_objects
from gateway.supervisor import SERVING, ServeOptions, configure_logging

log = logging.getLogger("lockgate")
# How long an unread request body is still read (and dropped) after an early answer, so the client sees the answer.
_LINGER_S = 2.0
# How often, and at most how long, the heap waits for Presidio's background load before it is frozen.
_FREEZE_POLL_S = 0.1
_FREEZE_WAIT_S = 300.0
_COLLECTOR_OFF_S = 30.0
# The loop shares the GIL with the inference writer's feeder thread and Presidio's background load. When the loop
# wakes while one of them runs Python, it waits for the interpreter's switch interval (5 ms by default): 1 ms
# bounds that wait at the cost of a few more switches while both run.
_SWITCH_INTERVAL_S = 0.001

__all__ = ["ServeOptions", "run_worker"]


def _watch_supervisor(loop: asyncio.AbstractEventLoop, channel: Connection, stop: asyncio.Event) -> None:
    """The supervisor never writes to the channel: it becomes readable when the supervisor is gone (its end closed
    with its process), and a worker left alone on the port drains and stops instead of serving unsupervised."""
    def gone() -> None:
        loop.remove_reader(channel.fileno())
        if not stop.is_set():
            log.error("the supervisor is gone: stopping")
            stop.set()

    loop.add_reader(channel.fileno(), gone)


async def _freeze_when_loaded(loading: Callable[[], bool]) -> None:
    """Presidio loads in the background after the first freeze; a full collection then walked its ~64 k objects and
    their large tables for 65-180 ms, stalling every request in flight. Frozen, a full collection walks only what was
    made since. The load leaves no garbage (a collection right after it found none), so no collection precedes.

    Until then (at most _COLLECTOR_OFF_S) the automatic collector is off: the load's own allocations set off full
    collections of 40-75 ms, on the loop's thread as often as on the loader's, while the worker already served."""
    deadline = time.monotonic() + _FREEZE_WAIT_S
    collector_back = time.monotonic() + _COLLECTOR_OFF_S
    gc.disable()
    try:
        while loading() and time.monotonic() < deadline:
            if time.monotonic() >= collector_back:
                gc.enable()
            await asyncio.sleep(_FREEZE_POLL_S)
        gc.freeze()
        record_frozen_objects()
    finally:
        gc.enable()


async def _serve_worker(options: ServeOptions, reuse_port: bool, channel: Connection | None) -> None:
    app = create_app(options.policy_path)
    server = app[SERVER_CONFIG]
    drain_s = options.shutdown_timeout_s - flush_reserve_s(options.shutdown_timeout_s)
    limits = ClientLimits(server.header_timeout_s, server.write_timeout_s, server.max_connections)
    runner = GatewayRunner(app, limits=limits, handle_signals=False, access_log=None,
                           shutdown_timeout=drain_s,
                           keepalive_timeout=server.keepalive_timeout_s,
                           max_field_size=8190, max_line_size=8190, max_headers=128,
                           lingering_time=_LINGER_S)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, reuse_port=reuse_port or None, backlog=2048)
    await site.start()
    # What the start built (modules, policy, engines' handles) lives as long as the process: frozen, it is no longer
    # walked by every full collection, which cost ~5% of a request's CPU under load.
    gc.collect()
    gc.freeze()
    record_frozen_objects()
    loop = asyncio.get_running_loop()
    guardrails = app[GATEWAY].policy.guardrails
    freezing = loop.create_task(_freeze_when_loaded(lambda: guardrails is not None and guardrails.loading))
    stop = asyncio.Event()
    holder = app[GATEWAY].holder
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(holder.reload()))
    log.info("serving on http://%s:%d (policy %s)", options.host, options.port, app[GATEWAY].policy.version)
    if channel is not None:
        channel.send_bytes(SERVING)
        _watch_supervisor(loop, channel, stop)
    await stop.wait()
    app[GATEWAY].stop_deadline = time.monotonic() + options.shutdown_timeout_s
    log.info("draining in-flight requests (up to %.0f s)", drain_s)
    freezing.cancel()
    await runner.cleanup()
    log.info("stopped")


def run_worker(options: ServeOptions, reuse_port: bool, channel: Connection | None = None) -> None:
    """Serves until SIGTERM/SIGINT. `channel`: the socket pair end of a supervised worker, told when it serves."""
    configure_logging()
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    # Until the loop's handlers are in place, a reload request must not end the start (SIGHUP's default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if channel is not None:
        # A terminal's Ctrl-C reaches the whole group; the supervisor turns it into one SIGTERM per worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_serve_worker(options, reuse_port, channel))
