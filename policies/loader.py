"""Reading a policy file: YAML with line numbers, ${VAR} from the environment, pydantic validation.

Every problem is reported as `FILE:LINE: yaml.path: message`, all of them at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from policies.schema import POLICY_DIR, Policy

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ONLY_ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    message: str


class PolicyError(Exception):
    """A policy file that cannot be used; `problems` holds each error with its place."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.format())

    def format(self) -> str:
        lines = []
        for p in self.problems:
            where = f"{self.source}:{p.line}" if p.line else self.source
            lines.append(f"{where}: {p.path or '(top level)'}: {p.message}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: str
    sha256: str
    loaded_at: float = field(default_factory=time.time)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Reader:
    """Turns YAML nodes into plain data while remembering the line of every path."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.loader = yaml.SafeLoader(text)
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.raw: dict[Loc, str] = {}
        self.problems: list[tuple[Loc, str]] = []

    def read(self) -> object:
        try:
            node = self.loader.get_single_node()
        finally:
            self.loader.dispose()
        return None if node is None else self._node(node, ())

    def _node(self, node: yaml.Node, loc: Loc) -> object:
        self.lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out: dict[object, object] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append((loc, "mapping keys must be plain strings"))
                    continue
                # The key's text as written: YAML 1.1 would read `on:` (retry conditions) as True.
                key = key_node.value
                if key in out:
                    self.lines[(*loc, key)] = key_node.start_mark.line + 1
                    self.problems.append(((*loc, key), "appears twice in the same mapping"))
                out[key] = self._node(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._node(item, (*loc, i)) for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and "${" in value:
            self.raw[loc] = value
            value = self._substitute(value, loc)
        return value

    def _substitute(self, value: str, loc: Loc) -> str:
        def one(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.problems.append((loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_REF.sub(one, value)


def _line_for(lines: dict[Loc, int], data: object, loc: Loc) -> tuple[Loc, int | None]:
    """Follows a pydantic error location through the data, skipping union tags it added."""
    walked: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]  # type: ignore[index]
            walked.append(part)
    path = tuple(walked)
    while path and path not in lines:
        path = path[:-1]
    missing_field = len(walked) < len(loc) and isinstance(loc[-1], str)
    shown = (*walked, loc[-1]) if missing_field and loc[-1] not in walked[-1:] else tuple(walked)
    return shown, lines.get(path)


def _reference_problems(policy: Policy) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    for i, key in enumerate(policy.keys):
        if key.id in seen:
            problems.append((("keys", i, "id"), f"key id {key.id!r} is used more than once"))
        seen.add(key.id)
        if key.user not in policy.users:
            problems.append((("keys", i, "user"), f"user {key.user!r} is not defined under 'users'"))
    for i, binding in enumerate(policy.bindings):
        if binding.role not in policy.roles:
            problems.append((("bindings", i, "role"), f"role {binding.role!r} is not defined under 'roles'"))
        if binding.user is not None and binding.user not in policy.users:
            problems.append((("bindings", i, "user"), f"user {binding.user!r} is not defined under 'users'"))
    for name, route in policy.routes.items():
        for i, target in enumerate(route.targets):
            if target.provider not in policy.providers:
                problems.append(
                    (("routes", name, "targets", i, "provider"),
                     f"provider {target.provider!r} is not defined under 'providers'")
                )
        for i, fallback in enumerate(route.fallbacks):
            if fallback not in policy.routes or fallback == name:
                problems.append((("routes", name, "fallbacks", i), f"{fallback!r} is not another route"))
        if route.shadow is not None and (route.shadow.route not in policy.routes or route.shadow.route == name):
            problems.append((("routes", name, "shadow", "route"), f"{route.shadow.route!r} is not another route"))
        if all(t.weight == 0 for t in route.targets):
            problems.append((("routes", name, "targets"), "every target has weight 0"))
    return problems


def parse_policy(text: str, source: str = "<policy>", env: Mapping[str, str] | None = None,
                 folder: str | os.PathLike[str] | None = None) -> LoadedPolicy:
    """Validates a policy text; raises PolicyError listing every problem with its line. Relative paths in it are
    resolved against `folder` (the policy file's), or left relative when there is none."""
    reader = _Reader(text, os.environ if env is None else env)
    try:
        data = reader.read()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(source, [Problem("", line, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from None
    problems = [Problem(_dotted(loc), reader.lines.get(loc), msg) for loc, msg in reader.problems]
    if not isinstance(data, dict):
        raise PolicyError(source, [*problems, Problem("", 1, "the policy file must be a YAML mapping")])
    keys = data.get("keys")
    for i, entry in enumerate(keys if isinstance(keys, list) else []):
        if isinstance(entry, dict) and "key" in entry and not _ONLY_ENV_REF.match(reader.raw.get(("keys", i, "key"), "")):
            loc: Loc = ("keys", i, "key")
            problems.append(Problem(_dotted(loc), reader.lines.get(loc),
                                    "a plain key may not be written in the file: use ${ENV_VAR} or 'sha256'"))
    if problems:
        raise PolicyError(source, problems)
    try:
        policy = Policy.model_validate(data, context={POLICY_DIR: None if folder is None else os.fspath(folder)})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            shown, line = _line_for(reader.lines, data, tuple(err["loc"]))
            problems.append(Problem(_dotted(shown), line, err["msg"]))
        raise PolicyError(source, problems) from None
    refs = _reference_problems(policy)
    if refs:
        raise PolicyError(source, [Problem(_dotted(loc), _line_for(reader.lines, data, loc)[1], msg) for loc, msg in refs])
    return LoadedPolicy(policy, source, hashlib.sha256(text.encode()).hexdigest())


def load_policy(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedPolicy:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, [Problem("", None, f"cannot read the file: {exc.strerror or exc}")]) from None
    # The folder as named, symlinks kept: a mounted ConfigMap's file is a link into a folder renamed on every update.
    return parse_policy(text, source, env, os.path.dirname(os.path.abspath(path)))
