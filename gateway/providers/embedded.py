"""Models served by the vLLM engine inside the gateway, behind the same interface as HTTP upstreams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp

from gateway.providers.base import ChunkStream, Completion, Op, Provider, UpstreamError, Usage
from policies.schema import EmbeddedProviderConfig
from runtime import EmbeddedEngine, EngineState, EngineUnavailableError, InvalidRequestError, RuntimeFailure


def _failure(name: str, error: RuntimeFailure) -> UpstreamError:
    # Every runtime error carries its OpenAI code; routing answers a 400 with it, and other kinds with its own codes.
    if isinstance(error, InvalidRequestError):
        return UpstreamError("status", str(error), 400, {"message": str(error), "param": error.param, "code": error.code})
    detail = {"message": str(error), "code": error.code}
    if isinstance(error, EngineUnavailableError):
        return UpstreamError("connect", f"{name}: {error}", None, detail)
    return UpstreamError("invalid", f"{name}: {error}", None, detail)


class EmbeddedProvider(Provider):
    ops = frozenset({"chat", "completions", "embeddings"})

    def __init__(self, name: str, config: EmbeddedProviderConfig) -> None:
        super().__init__(name)
        self.engine = EmbeddedEngine(config.model, config.engine, config.served_model_name,
                                     tool_parser=config.tool_parser, tool_strict_level=config.tool_strict_level,
                                     chat_template=config.chat_template)
        self.eager = config.load == "eager"
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The gateway answers /readyz (not ready) while an eager engine loads, instead of blocking start-up.
        if self.eager:
            self._starting = asyncio.get_running_loop().create_task(self._start_engine())

    async def _start_engine(self) -> None:
        # On failure the engine's status names the cause; /readyz and /v1/models show it.
        with contextlib.suppress(RuntimeFailure):
            await self.engine.start()

    async def close(self) -> None:
        await self.engine.stop()

    def load(self) -> dict[str, float]:
        load = self.engine.load
        return {"running": load.running, "waiting": load.waiting, "kv_cache_usage": load.kv_cache_usage}

    @property
    def state(self) -> str:
        status = self.engine.status
        if status.state is EngineState.IDLE:
            return "lazy"
        return str(status)

    async def complete(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> Completion:
        if op not in self.ops:
            return await super().complete(op, body, timeout)
        call = {"chat": self.engine.chat, "completions": self.engine.completions,
                "embeddings": self.engine.embeddings}[op]
        try:
            async with asyncio.timeout(timeout.total):
                data = await call(body, request_id, priority)
        except TimeoutError:
            raise UpstreamError("timeout", f"{self.name}: no answer within the timeout") from None
        except RuntimeFailure as error:
            raise _failure(self.name, error) from None
        return Completion(data, None, Usage.from_openai(data.get("usage")))

    async def stream(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> ChunkStream:
        if op == "embeddings":
            return await super().stream(op, body, timeout)
        opened = (self.engine.stream_chat if op == "chat" else self.engine.stream_completions)(body, request_id, priority)
        return ChunkStream(self._chunks(opened), lambda: None)

    async def _chunks(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield chunk
        except RuntimeFailure as error:
            raise _failure(self.name, error) from None
        finally:
            # Closing the engine's generator aborts the request, so a client that left frees its KV cache.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
