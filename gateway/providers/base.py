"""The one small interface every provider implements, and the types that cross it.

Bodies and chunks are OpenAI-shaped dicts on both sides: a provider that speaks another wire format
translates at its edge, so nothing above it knows which provider served a request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

Op = Literal["chat", "completions", "embeddings"]
FailureKind = Literal["status", "timeout", "connect", "invalid", "reset"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: object) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        return cls(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int(cached or 0),
        )


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer. `body` holds the upstream's bytes when they pass through as they are."""

    data: dict
    body: bytes | None
    usage: Usage | None


class UpstreamError(Exception):
    """A provider failed: `kind` says how, `status` is the upstream's HTTP status where there was one."""

    def __init__(self, kind: FailureKind, detail: str, status: int | None = None, error: dict | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.error = error

    @property
    def condition(self) -> int | str:
        """What retry policies match on: the HTTP status, or the failure kind."""
        return self.status if self.kind == "status" and self.status is not None else self.kind


class UnsupportedOperation(Exception):
    def __init__(self, provider: str, op: Op) -> None:
        super().__init__(f"provider {provider!r} does not serve /v1/{op.replace('chat', 'chat/completions')}")


def _nothing_buffered() -> bool:
    return False


class ChunkStream:
    """An opened stream: the upstream accepted the request; iterate for chunk dicts, always aclose()."""

    def __init__(
        self,
        chunks: AsyncIterator[dict],
        on_close: Callable[[], Awaitable[None] | None],
        buffered: Callable[[], bool] | None = None,
    ) -> None:
        self._chunks = chunks
        self._on_close = on_close
        # True when the next chunk has already arrived, so a relay may hold its write and send both at once.
        # An attribute rather than a method: the relay asks once per chunk.
        self.buffered: Callable[[], bool] = buffered or _nothing_buffered

    def __aiter__(self) -> AsyncIterator[dict]:
        return self._chunks

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        result = self._on_close()
        if result is not None:
            await result


class Provider:
    """Base for providers: lifetime hooks, and one method per way of answering."""

    ops: frozenset[str] = frozenset({"chat", "completions", "embeddings"})

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:
        """Opens what the provider holds for its lifetime (client session, engine)."""

    async def close(self) -> None:
        """Releases it; called once, after the last request that used this provider."""

    @property
    def state(self) -> str:
        return "ready"

    async def complete(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> Completion:
        raise UnsupportedOperation(self.name, op)

    async def stream(
        self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, *, request_id: str = "", priority: int = 0
    ) -> ChunkStream:
        """Opens a stream. `request_id` and `priority` matter to engines that schedule, not to HTTP upstreams."""
        raise UnsupportedOperation(self.name, op)
