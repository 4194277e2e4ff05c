from __future__ import annotations

from typing import Any

from policies.schema import Policy

ROUTES = ("chat-small", "chat-large", "embed")


def make_policy(**sections: Any) -> Policy:
    """A valid policy with users alice and bob (group eng), carol (group ops) and three routes."""
    document: dict[str, Any] = {
        "version": 1,
        "users": {"alice": {"groups": ["eng"]}, "bob": {"groups": ["eng"]}, "carol": {"groups": ["ops"]}},
        "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "routes": {name: {"targets": [{"provider": "up"}]} for name in ROUTES},
    }
    document.update(sections)
    return Policy.model_validate(document)
