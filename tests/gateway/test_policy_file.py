"""The policy file: validation with YAML paths and lines, ${VAR}, `lockgate check`, keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policies.keys import KeyRing, hash_key
from policies.loader import PolicyError, parse_policy

GOOD = f"""\
version: 1
keys:
  - {{id: alice-laptop, sha256: "{hash_key("lg-alice")}", user: alice}}
  - {{id: ci-bot, key: "${{CI_BOT_KEY}}", user: ci-bot}}
users: {{alice: {{groups: [data-science]}}, ci-bot: {{groups: [automation]}}}}
providers:
  openai: {{type: openai, api_key: "${{OPENAI_API_KEY}}"}}
routes:
  chat-default: {{targets: [{{provider: openai, model: gpt-4o-mini}}]}}
"""


def test_a_good_policy_loads_and_reads_the_environment() -> None:
    loaded = parse_policy(GOOD, env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    assert loaded.policy.providers["openai"].api_key == "sk-x"
    ring = KeyRing(loaded.policy)
    alice = ring.authenticate("lg-alice")
    assert alice is not None and alice.user == "alice" and alice.groups == ("data-science",)
    bot = ring.authenticate("lg-ci-bot-secret")
    assert bot is not None and bot.key_id == "ci-bot"
    assert ring.authenticate("lg-alicE") is None


def test_a_missing_environment_variable_is_named() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(GOOD, env={"OPENAI_API_KEY": "sk-x"})
    problem = info.value.problems[0]
    assert "CI_BOT_KEY" in problem.message and problem.line == 4 and problem.path == "keys[1].key"


def test_a_plain_key_in_the_file_is_refused() -> None:
    text = GOOD.replace('key: "${CI_BOT_KEY}"', 'key: "lg-plaintext-secret"')
    with pytest.raises(PolicyError) as info:
        parse_policy(text, env={"OPENAI_API_KEY": "sk-x"})
    assert info.value.problems[0].path == "keys[1].key"
    assert "lg-plaintext-secret" not in info.value.format()


def test_every_error_is_reported_with_its_path_and_line() -> None:
    text = GOOD.replace("provider: openai, model", "provider: opneai, model").replace(
        "users: {alice", "users: {alice: {groups: [x]}, bob: {grups: [y]}, alicex").replace(
        "version: 1", "version: 1\nserver: {port: 99999}")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    found = {(p.path, p.line) for p in info.value.problems}
    assert ("server.port", 2) in found
    assert any(path.startswith("users.bob.grups") and line == 6 for path, line in found)
    text = GOOD.replace("provider: openai, model", "provider: opneai, model")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    (problem,) = info.value.problems
    assert problem.path == "routes.chat-default.targets[0].provider" and problem.line == 9
    assert "opneai" in problem.message


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("version: 1\nroutes: {a: [\n  b: c\n")
    assert info.value.problems[0].line is not None and "invalid YAML" in info.value.problems[0].message


def test_unknown_provider_type_is_reported_at_its_line() -> None:
    text = GOOD.replace("{type: openai,", "{type: openia,")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    assert info.value.problems[0].path.startswith("providers.openai") and info.value.problems[0].line == 7


def _lockgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_lockgate_check_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD.replace("provider: openai, model", "provider: nowhere, model"))
    result = _lockgate("check", str(path), env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    assert result.returncode == 1
    assert f"{path}:9: routes.chat-default.targets[0].provider" in result.stderr
    path.write_text(GOOD)
    result = _lockgate("check", str(path), env={"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"})
    assert result.returncode == 0 and "OK" in result.stdout


def test_lockgate_check_warns_of_a_routed_model_without_a_price(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    env = {"CI_BOT_KEY": "lg-ci-bot-secret", "OPENAI_API_KEY": "sk-x"}
    path.write_text(GOOD)
    result = _lockgate("check", str(path), env=env)
    assert result.returncode == 0
    assert "warning: routes.chat-default: model 'gpt-4o-mini' has no entry under 'prices'" in result.stderr
    path.write_text(GOOD + "prices: {gpt-4o-mini: {input: 0.15, output: 0.6}}\n")
    result = _lockgate("check", str(path), env=env)
    assert result.returncode == 0 and "warning" not in result.stderr
    path.write_text(GOOD + "prices: {gpt-4o-mini: {input: 0.15, output: 0.6, cache_write: 0.0000001}}\n")
    result = _lockgate("check", str(path), env=env)
    assert result.returncode == 1 and "prices.gpt-4o-mini" in result.stderr and "6 decimal places" in result.stderr


def test_keys_new_prints_a_key_once_and_its_hash_line() -> None:
    result = _lockgate("keys", "new", "--user", "alice", "--id", "alice-2")
    assert result.returncode == 0
    key = result.stderr.strip().rsplit(" ", 1)[-1]
    assert key.startswith("lg-") and len(key) > 30
    assert result.stdout.strip() == f'- {{id: alice-2, sha256: "{hash_key(key)}", user: alice}}'
    assert key not in result.stdout
