"""The active policy version, and how a new one replaces it: validate, compile, swap, or keep the old."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from gateway import metrics
from gateway.compiled import CompiledPolicy, ProviderPool, compile_policy
from gateway.governance import CounterStores, build_governance
from gateway.guarding import build_guardrails
from policies.loader import LoadedPolicy, PolicyError, load_policy

log = logging.getLogger("lockgate.policy")


def file_stamp(path: str | os.PathLike[str]) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


class PolicyHolder:
    """Owns the policy file's active compiled version; requests read `current` once and keep it."""

    def __init__(self, path: str | os.PathLike[str], pool: ProviderPool) -> None:
        self.path = Path(path)
        self.pool = pool
        self.stores = CounterStores()
        self.current: CompiledPolicy | None = None
        self._lock = asyncio.Lock()
        self._stamp: tuple[float, int] | None = None

    async def activate_initial(self, loaded: LoadedPolicy, stamp: tuple[float, int] | None) -> CompiledPolicy:
        """Compiles the version read at start-up; `stamp` is the file's as it was then, so a later edit reloads."""
        self._stamp = stamp
        self.current = await self._compile(loaded)
        log.info("policy %s loaded from %s", self.current.version, self.path)
        return self.current

    async def reload(self) -> tuple[bool, str]:
        """Loads the file again; on any error the running version stays. Returns (changed, message)."""
        async with self._lock:
            self._stamp = file_stamp(self.path)
            try:
                loaded = load_policy(self.path)
            except PolicyError as exc:
                metrics.RELOADS.labels("rejected").inc()
                log.error("policy reload rejected, still serving %s:\n%s", self._version(), exc.format())
                return False, exc.format()
            if self.current is not None and loaded.sha256 == self.current.loaded.sha256:
                return False, f"policy {self.current.version} is unchanged"
            try:
                compiled = await self._compile(loaded)
            except Exception as exc:
                metrics.RELOADS.labels("failed").inc()
                log.exception("policy reload failed, still serving %s", self._version())
                return False, f"policy could not be activated: {exc}"
            previous, self.current = self._version(), compiled
            metrics.RELOADS.labels("applied").inc()
            log.info("policy %s active (was %s)", compiled.version, previous)
            return True, f"policy {compiled.version} active"

    async def _compile(self, loaded: LoadedPolicy) -> CompiledPolicy:
        store = self.stores.store_for(loaded.policy.limiter)
        governance = await asyncio.to_thread(build_governance, loaded.policy, store, self.current is not None)
        guard = await asyncio.to_thread(build_guardrails, loaded.policy)
        return compile_policy(loaded, await self.pool.sync(loaded), governance, guard)

    def _version(self) -> str:
        return self.current.version if self.current is not None else "none"

    async def watch(self, interval_s: float) -> None:
        """Reloads when the file's mtime or size changes; editors that replace the file are covered too."""
        while True:
            await asyncio.sleep(interval_s)
            if file_stamp(self.path) != self._stamp:
                await self.reload()
