"""OpenAI, Azure OpenAI and any OpenAI-compatible server (vLLM's, for one): bodies pass through as they are."""

from __future__ import annotations

import aiohttp
import orjson

from gateway.providers.base import ChunkStream, Completion, LastEvent, Op, Provider, answer_usage
from gateway.providers.http import DEFAULT_LIMITS, HttpLimits, HttpTransport, credentials

_PATHS: dict[str, str] = {"chat": "chat/completions", "completions": "completions", "embeddings": "embeddings"}


class OpenAIProvider(Provider):
    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None,
        headers: dict[str, str],
        max_connections: int,
        organization: str | None = None,
        limits: HttpLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(name)
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json", **headers}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if organization:
            self.headers["OpenAI-Organization"] = organization
        self.transport = HttpTransport(name, max_connections, limits=limits, secrets=credentials(self.headers, api_key))

    async def start(self) -> None:
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    def url(self, op: Op, body: dict) -> str:
        return f"{self.base_url}/{_PATHS[op]}"

    async def complete(self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, **_: object) -> Completion:
        response = await self.transport.post(self.url(op, body), orjson.dumps(body), self.headers, timeout)
        data, raw = await self.transport.read_json(response)
        return Completion(data, raw, answer_usage(data, op, self.name))

    async def stream(self, op: Op, body: dict, timeout: aiohttp.ClientTimeout, **_: object) -> ChunkStream:
        if op == "embeddings":
            return await super().stream(op, body, timeout)
        response = await self.transport.post(self.url(op, body), orjson.dumps(body), self.headers, timeout)
        if not response.content_type.startswith("text/event-stream"):
            response.release()
            raise self.transport.failure("invalid", "upstream did not answer with an event stream")
        reader = self.transport.event_reader(response)
        last = LastEvent()
        return ChunkStream(self.transport.openai_chunks(response, reader, last), response.release, reader.has_buffered,
                           last)


class AzureOpenAIProvider(OpenAIProvider):
    """Azure names deployments in the URL and authenticates with an `api-key` header."""

    def __init__(
        self, name: str, base_url: str, api_key: str | None, headers: dict[str, str], max_connections: int,
        api_version: str, limits: HttpLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(name, base_url, None, headers, max_connections, limits=limits)
        self.api_version = api_version
        if api_key:
            self.headers["api-key"] = api_key
        self.transport.secrets = credentials(self.headers, api_key)

    def url(self, op: Op, body: dict) -> str:
        return f"{self.base_url}/openai/deployments/{body['model']}/{_PATHS[op]}?api-version={self.api_version}"
