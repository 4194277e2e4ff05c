"""Who may call which route, decided by Casbin over policy lines generated from `roles` and `bindings`.

Casbin evaluates each (subject, route, action) once per policy version; the answer is then a dict
lookup, because Casbin's matcher walks every policy line (milliseconds with ~1,000 lines).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from importlib import resources

import casbin

from policies.keys import Principal
from policies.schema import Policy

CALL = "call"
ADMIN = "admin"
_MAX_CACHED_DECISIONS = 100_000


def _model_path() -> str:
    return str(resources.files("policies") / "rbac_model.conf")


def user_subject(user: str) -> str:
    return f"user:{user}"


def group_subject(group: str) -> str:
    return f"group:{group}"


def role_subject(role: str) -> str:
    return f"role:{role}"


def policy_lines(policy: Policy) -> tuple[list[list[str]], list[list[str]]]:
    """Casbin `p` lines (role, route glob, action) and `g` lines (member, role or group)."""
    permissions: list[list[str]] = []
    for name, role in policy.roles.items():
        permissions.extend([role_subject(name), pattern, CALL] for pattern in role.models)
        if role.admin:
            permissions.append([role_subject(name), "*", ADMIN])
    groupings: list[list[str]] = []
    for name, user in policy.users.items():
        groupings.extend([user_subject(name), group_subject(group)] for group in user.groups)
    for binding in policy.bindings:
        member = user_subject(binding.user) if binding.user is not None else group_subject(binding.group or "")
        groupings.append([member, role_subject(binding.role)])
    return permissions, groupings


def build_enforcer(policy: Policy) -> casbin.Enforcer:
    enforcer = casbin.Enforcer(_model_path())
    enforcer.add_function("routeMatch", fnmatchcase)
    permissions, groupings = policy_lines(policy)
    if permissions:
        enforcer.add_policies(permissions)
    if groupings:
        enforcer.add_grouping_policies(groupings)
    return enforcer


class Authorizer:
    """RBAC decisions for one policy version; deny unless a bound role allows."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._enforcer = build_enforcer(policy)
        self._decisions: dict[tuple[str, tuple[str, ...], str, str], bool] = {}

    def warm(self) -> None:
        """Decide every configured user on every configured route now, e.g. in a thread before a reload
        goes live, so no request waits for Casbin (about a millisecond a decision with ~1,000 lines)."""
        for name, user in self._policy.users.items():
            principal = Principal(key_id="", user=name, groups=tuple(user.groups))
            self.is_admin(principal)
            self.visible_routes(principal, list(self._policy.routes))

    def _decide(self, principal: Principal, obj: str, act: str) -> bool:
        cache_key = (principal.user, principal.groups, obj, act)
        decision = self._decisions.get(cache_key)
        if decision is None:
            subjects = [user_subject(principal.user), *(group_subject(g) for g in principal.groups)]
            decision = any(self._enforcer.enforce(subject, obj, act) for subject in subjects)
            if len(self._decisions) >= _MAX_CACHED_DECISIONS:
                # Route names come from clients; a bound keeps random names from growing the cache.
                self._decisions.clear()
            self._decisions[cache_key] = decision
        return decision

    def can_call(self, principal: Principal, route: str) -> bool:
        return self._decide(principal, route, CALL)

    def is_admin(self, principal: Principal) -> bool:
        return self._decide(principal, "*", ADMIN)

    def visible_routes(self, principal: Principal, routes: list[str]) -> list[str]:
        return [route for route in routes if self.can_call(principal, route)]


def explain(policy: Policy, user: str) -> str:
    """A readable account of what `user` may do and through which bindings."""
    if user not in policy.users:
        return f"user {user!r} is not defined under 'users': every request is denied"
    groups = policy.users[user].groups
    lines = [f"user {user}", f"  groups: {', '.join(groups) or '(none)'}"]
    role_sources: dict[str, list[str]] = {}
    for binding in policy.bindings:
        if binding.user == user:
            role_sources.setdefault(binding.role, []).append("bound to the user")
        elif binding.group is not None and binding.group in groups:
            role_sources.setdefault(binding.role, []).append(f"via group {binding.group}")
    if not role_sources:
        lines.append("  roles: (none): every request is denied")
        return "\n".join(lines)
    lines.append("  roles:")
    for role, sources in role_sources.items():
        config = policy.roles[role]
        allows = ", ".join(config.models) or "(no routes)"
        admin = "; admin API" if config.admin else ""
        lines.append(f"    {role} ({'; '.join(sources)}): routes {allows}{admin}")
    principal = Principal(key_id="", user=user, groups=tuple(groups))
    authorizer = Authorizer(policy)
    allowed = authorizer.visible_routes(principal, list(policy.routes))
    denied = [route for route in policy.routes if route not in allowed]
    lines.append(f"  may call: {', '.join(allowed) or '(no configured route)'}")
    lines.append(f"  denied: {', '.join(denied) or '(none)'}")
    lines.append(f"  admin API: {'yes' if authorizer.is_admin(principal) else 'no'}")
    return "\n".join(lines)
