"""Running the gateway: one process, or N workers sharing one port through SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass

import uvloop
from aiohttp import web

from gateway.api.connections import ClientLimits, GatewayRunner
from gateway.app import SERVER_CONFIG, create_app, flush_reserve_s
from gateway.context import GATEWAY

log = logging.getLogger("lockgate")
# How long an unread request body is still read (and dropped) after an early answer, so the client sees the answer.
_LINGER_S = 2.0


@dataclass(frozen=True)
class ServeOptions:
    policy_path: str
    host: str
    port: int
    workers: int
    shutdown_timeout_s: float


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOCKGATE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [%(name)s pid={os.getpid()}] %(message)s",
        stream=sys.stderr,
    )
    # Presidio reports every recognizer of other languages it skips, at each start: noise, not news.
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)


async def _serve_worker(options: ServeOptions, reuse_port: bool) -> None:
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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    holder = app[GATEWAY].holder
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(holder.reload()))
    log.info("serving on http://%s:%d (policy %s)", options.host, options.port, app[GATEWAY].policy.version)
    await stop.wait()
    app[GATEWAY].stop_deadline = time.monotonic() + options.shutdown_timeout_s
    log.info("draining in-flight requests (up to %.0f s)", drain_s)
    await runner.cleanup()
    log.info("stopped")


def run_worker(options: ServeOptions, reuse_port: bool) -> None:
    configure_logging()
    uvloop.run(_serve_worker(options, reuse_port))


def serve(options: ServeOptions) -> int:
    """Blocks until SIGTERM/SIGINT; with several workers the parent forwards signals to them."""
    if options.workers == 1:
        run_worker(options, reuse_port=False)
        return 0
    configure_logging()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_worker, args=(options, True), name=f"lockgate-worker-{i}")
               for i in range(options.workers)]
    for worker in workers:
        worker.start()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("started %d workers on port %d", options.workers, options.port)
    code = 0
    for worker in workers:
        worker.join()
        if worker.exitcode and not stopping:
            log.error("%s exited with code %s", worker.name, worker.exitcode)
            code = 1
    return code
