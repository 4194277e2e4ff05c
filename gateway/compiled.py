"""A policy version turned into what the hot path reads: dicts and tuples, built once per version."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

from gateway.governance import Governance
from gateway.guarding import RouteGuards, route_guards, routed_models
from gateway.providers import Provider, build_provider
from gateway.providers.http import client_timeout
from guardrails import Guardrails
from policies.keys import KeyRing
from policies.loader import LoadedPolicy
from policies.schema import RouteConfig, TimeoutConfig

log = logging.getLogger("lockgate.policy")


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str
    weight: float
    timeout: aiohttp.ClientTimeout

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    config: RouteConfig
    targets: tuple[Target, ...]
    guards: RouteGuards


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    loaded: LoadedPolicy
    version: str
    keyring: KeyRing
    routes: dict[str, Route]
    providers: dict[str, Provider]
    governance: Governance
    guardrails: Guardrails | None
    log_payloads: bool
    mask_payloads: bool
    group_priorities: dict[str, int]


def _timeout(config: TimeoutConfig) -> aiohttp.ClientTimeout:
    return client_timeout(config.connect_ms, config.first_byte_ms, config.total_ms)


class ProviderPool:
    """Keeps provider instances (client sessions, engines) alive across policy versions while unchanged."""

    def __init__(self, retire_after_s: float) -> None:
        self._live: dict[str, tuple[object, Provider]] = {}
        self._retire_after_s = retire_after_s
        self._retiring: set[asyncio.Task[None]] = set()

    async def sync(self, loaded: LoadedPolicy) -> dict[str, Provider]:
        wanted = loaded.policy.providers
        fresh: dict[str, tuple[object, Provider]] = {}
        started: list[Provider] = []
        try:
            for name, config in wanted.items():
                current = self._live.get(name)
                if current is not None and current[0] == config:
                    fresh[name] = current
                    continue
                provider = build_provider(name, config)
                await provider.start()
                started.append(provider)
                fresh[name] = (config, provider)
        except BaseException:
            for provider in started:
                await provider.close()
            raise
        for name, (_, provider) in self._live.items():
            if fresh.get(name, (None, None))[1] is not provider:
                self._retire(provider)
        self._live = fresh
        return {name: provider for name, (_, provider) in fresh.items()}

    def _retire(self, provider: Provider) -> None:
        async def later() -> None:
            # Requests admitted under the old version may still be using it.
            await asyncio.sleep(self._retire_after_s)
            await provider.close()

        task = asyncio.get_running_loop().create_task(later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for _, provider in self._live.values():
            await provider.close()
        self._live = {}


def compile_policy(
    loaded: LoadedPolicy, providers: dict[str, Provider], governance: Governance, guard: Guardrails | None
) -> CompiledPolicy:
    policy = loaded.policy
    ner = policy.guardrails.pii.ner
    routes: dict[str, Route] = {}
    for name, config in policy.routes.items():
        targets = []
        for target in config.targets:
            provider_config = policy.providers[target.provider]
            timeout = config.timeout or getattr(provider_config, "timeout", None) or TimeoutConfig()
            targets.append(Target(providers[target.provider], target.model or name, target.weight, _timeout(timeout)))
        guards = route_guards(guard, config.guardrails.input, config.guardrails.output, ner,
                              routed_models(policy, name))
        routes[name] = Route(name, config, tuple(targets), guards)
    table = policy.inference_table
    log_payloads = table.enabled and table.log_payloads
    return CompiledPolicy(loaded, loaded.sha256[:12], KeyRing(policy), routes, providers, governance, guard,
                          log_payloads, log_payloads and table.mask_pii and guard is not None,
                          dict(policy.group_priorities))
