"""Relative paths in a policy file are the policy file's, and prepared models live in one store per user: both are
found whatever folder `lockgate` runs from."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from policies.loader import load_policy, parse_policy
from runtime import list_models, model_dir, resolve_model
from tests.conftest import ALICE_KEY, policy_text
from tests.served import free_port

LOCKGATE = str(Path(sys.executable).with_name("lockgate"))

POLICY = """
providers:
  local:
    type: embedded
    model: ./models/my-model
    chat_template: templates/tools.jinja
  catalog: {{type: embedded, model: smollm2-135m-instruct, load: lazy}}
routes:
  local: {{targets: [{{provider: local}}]}}
inference_table:
  enabled: true
  spool_dir: "${{SPOOL_DIR:-var/spool}}"
"""


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The policy's folder, and another folder the commands run from (it holds nothing to find)."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / "policy.yaml").write_text(policy_text(POLICY))
    monkeypatch.chdir(elsewhere)
    return conf, elsewhere


def test_relative_paths_resolve_against_the_policy_files_folder(places: tuple[Path, Path]) -> None:
    conf, _ = places
    policy = load_policy(os.path.relpath(conf / "policy.yaml")).policy

    assert policy.inference_table.clickhouse == f"chdb://{conf}/var/clickhouse"
    assert policy.inference_table.spool_dir == str(conf / "var" / "spool")
    local = policy.providers["local"]
    assert (local.model, local.chat_template) == (str(conf / "models" / "my-model"), str(conf / "templates/tools.jinja"))
    assert policy.providers["catalog"].model == "smollm2-135m-instruct", "a catalog name is not a path"
    from_env = load_policy(conf / "policy.yaml", env={"SPOOL_DIR": "spool-from-env"}).policy
    assert from_env.inference_table.spool_dir == str(conf / "spool-from-env")
    absolute = load_policy(conf / "policy.yaml", env={"SPOOL_DIR": "/srv/spool"}).policy
    assert absolute.inference_table.spool_dir == "/srv/spool"
    # A policy text with no file behind it keeps its paths as written.
    assert parse_policy((conf / "policy.yaml").read_text()).policy.inference_table.spool_dir == "var/spool"


def test_the_model_store_is_one_per_user_data_folder(places: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCKGATE_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    store = tmp_path / "data" / "lockgate" / "models"
    assert model_dir() == store
    prepared = store / "smollm2-135m-instruct"
    prepared.mkdir(parents=True)
    (prepared / "config.json").write_text("{}")

    assert resolve_model("smollm2-135m-instruct") == prepared
    assert next(m for m in list_models() if m.name == "smollm2-135m-instruct").prepared
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_dir() == tmp_path / "home" / ".local" / "share" / "lockgate" / "models"
    monkeypatch.setenv("LOCKGATE_MODEL_DIR", "mine")
    assert model_dir() == places[1] / "mine"


async def test_serve_from_another_folder_keeps_its_data_next_to_the_policy(tmp_path: Path) -> None:
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / "policy.yaml").write_text(policy_text("inference_table: {{enabled: true}}\n"))
    port = free_port()
    # A TIKTOKEN_CACHE_DIR an earlier test set in this process would hide where the gateway's own default is.
    env = {**{k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"},
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "LOCKGATE_LOG_LEVEL": "INFO"}
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen([LOCKGATE, "serve", str(conf / "policy.yaml"), "--port", str(port)], cwd=elsewhere,
                                   env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/models",
                                           headers={"Authorization": f"Bearer {ALICE_KEY}"}) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert (conf / "var" / "clickhouse").is_dir() and (conf / "var" / "spool").is_dir()
    assert list(elsewhere.iterdir()) == [], "nothing is written to the working directory"
    assert list((tmp_path / "cache" / "lockgate" / "tiktoken").iterdir()), "tiktoken's files are in the user's cache"


def test_models_prepare_reports_each_step(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "smollm2-135m-instruct").mkdir(parents=True)
    (store / "smollm2-135m-instruct" / "config.json").write_text("{}" * 1000)
    done = subprocess.run([LOCKGATE, "models", "prepare", "smollm2-135m-instruct"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LOCKGATE_MODEL_DIR": str(store)})

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(store / "smollm2-135m-instruct")
    assert f"smollm2-135m-instruct is already prepared in {store / 'smollm2-135m-instruct'} (2 kB)" in done.stderr
