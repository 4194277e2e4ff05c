from __future__ import annotations

from typing import Any

from policies.keys import Principal
from policies.rbac import Authorizer, explain, policy_lines
from tests.policies.factory import ROUTES, make_policy

ALICE = Principal("k-alice", "alice", ("eng",))
BOB = Principal("k-bob", "bob", ("eng",))
CAROL = Principal("k-carol", "carol", ("ops",))


def rbac_policy() -> Any:
    return make_policy(
        roles={
            "chatter": {"models": ["chat-*"]},
            "embedder": {"models": ["embed"]},
            "root": {"models": ["*"], "admin": True},
        },
        bindings=[
            {"role": "chatter", "group": "eng"},
            {"role": "embedder", "user": "bob"},
            {"role": "root", "user": "carol"},
        ],
    )


def test_group_binding_and_route_globs() -> None:
    auth = Authorizer(rbac_policy())
    assert auth.can_call(ALICE, "chat-small")
    assert auth.can_call(ALICE, "chat-large")
    assert not auth.can_call(ALICE, "embed")
    assert auth.visible_routes(BOB, list(ROUTES)) == ["chat-small", "chat-large", "embed"]


def test_deny_by_default() -> None:
    auth = Authorizer(make_policy())
    assert not auth.can_call(ALICE, "chat-small")
    assert not auth.is_admin(ALICE)
    stranger = Principal("k-x", "mallory", ())
    assert not Authorizer(rbac_policy()).can_call(stranger, "chat-small")


def test_admin_capability_only_from_an_admin_role() -> None:
    auth = Authorizer(rbac_policy())
    assert auth.is_admin(CAROL)
    assert auth.can_call(CAROL, "anything-at-all")
    assert not auth.is_admin(ALICE)


def test_decisions_are_cached_per_policy_version() -> None:
    auth = Authorizer(rbac_policy())
    assert auth.can_call(ALICE, "chat-small")

    class Exploding:
        def enforce(self, *args: str) -> bool:
            raise AssertionError("Casbin evaluated a decision it had already made")

    auth._enforcer = Exploding()  # type: ignore[assignment]
    assert auth.can_call(ALICE, "chat-small")


def test_policy_lines_from_roles_and_bindings() -> None:
    permissions, groupings = policy_lines(rbac_policy())
    assert ["role:chatter", "chat-*", "call"] in permissions
    assert ["role:root", "*", "admin"] in permissions
    assert ["group:eng", "role:chatter"] in groupings
    assert ["user:alice", "group:eng"] in groupings


def test_explain_lists_roles_sources_and_routes() -> None:
    text = explain(rbac_policy(), "bob")
    assert "chatter (via group eng): routes chat-*" in text
    assert "embedder (bound to the user): routes embed" in text
    assert "may call: chat-small, chat-large, embed" in text
    assert "admin API: no" in text
    assert "every request is denied" in explain(rbac_policy(), "nobody")


def test_warm_decides_every_user_and_route_ahead_of_requests() -> None:
    auth = Authorizer(rbac_policy())
    auth.warm()

    class Exploding:
        def enforce(self, *args: str) -> bool:
            raise AssertionError("a request had to wait for Casbin")

    auth._enforcer = Exploding()  # type: ignore[assignment]
    assert auth.visible_routes(BOB, list(ROUTES)) == list(ROUTES)
    assert auth.is_admin(CAROL) and not auth.is_admin(ALICE)
