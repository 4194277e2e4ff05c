"""Providers: one module each behind `Provider`; `build_provider` turns a policy entry into one."""

from __future__ import annotations

from gateway.providers.base import (
    ChunkStream,
    Completion,
    Op,
    Provider,
    UnsupportedOperation,
    UpstreamError,
    Usage,
)
from policies.schema import (
    AnthropicProviderConfig,
    AzureProviderConfig,
    EmbeddedProviderConfig,
    OpenAIProviderConfig,
)

__all__ = [
    "ChunkStream", "Completion", "Op", "Provider", "UnsupportedOperation", "UpstreamError", "Usage", "build_provider",
]


def build_provider(
    name: str,
    config: OpenAIProviderConfig | AzureProviderConfig | AnthropicProviderConfig | EmbeddedProviderConfig,
) -> Provider:
    if isinstance(config, EmbeddedProviderConfig):
        from gateway.providers.embedded import EmbeddedProvider

        return EmbeddedProvider(name, config)
    from gateway.providers.http import HttpLimits

    limits = HttpLimits(config.max_head_bytes, config.max_response_bytes, config.max_event_bytes)
    if isinstance(config, OpenAIProviderConfig):
        from gateway.providers.openai import OpenAIProvider

        return OpenAIProvider(name, config.base_url, config.api_key, config.headers, config.max_connections,
                              config.organization, limits)
    if isinstance(config, AzureProviderConfig):
        from gateway.providers.openai import AzureOpenAIProvider

        return AzureOpenAIProvider(name, config.base_url, config.api_key, config.headers, config.max_connections,
                                   config.api_version, limits)
    from gateway.providers.anthropic import AnthropicProvider

    return AnthropicProvider(name, config.base_url, config.api_key, config.headers, config.max_connections,
                             config.anthropic_version, config.default_max_tokens, limits)
