"""Catalog models are prepared once into Hugging Face folders and found again by name or path."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import (
    EmbeddedEngine,
    EngineState,
    EngineUnavailableError,
    ModelNotFoundError,
    ModelNotPreparedError,
    list_models,
    prepare_model,
    resolve_model,
)
from tests.runtime.conftest import MODEL_DIR, MODEL_NAME


def test_prepared_folder_holds_weights_tokenizer_and_chat_template(model_path: Path) -> None:
    from transformers import AutoTokenizer

    assert (model_path / "model.safetensors").is_file()
    assert "<|im_start|>assistant" in AutoTokenizer.from_pretrained(model_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert not [entry for entry in model_path.parent.iterdir() if entry.name.startswith(f".{MODEL_NAME}.")], (
        "no half-converted staging folder is left next to the model"
    )


def test_prepare_again_reuses_the_folder(model_path: Path) -> None:
    weights = model_path / "model.safetensors"
    written = weights.stat().st_mtime_ns

    assert prepare_model(MODEL_NAME, model_path) == model_path
    assert weights.stat().st_mtime_ns == written


def test_models_are_listed_and_resolved_by_name_from_the_model_dir(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGATE_MODEL_DIR", str(MODEL_DIR))

    [listed] = [model for model in list_models() if model.name == MODEL_NAME]
    assert listed.prepared
    assert resolve_model(MODEL_NAME) == model_path
    assert resolve_model(str(model_path)) == model_path


def test_a_known_model_not_yet_prepared_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGATE_MODEL_DIR", str(tmp_path))

    assert not next(model for model in list_models() if model.name == MODEL_NAME).prepared
    with pytest.raises(ModelNotPreparedError, match=f"lockgate models prepare {MODEL_NAME}"):
        resolve_model(MODEL_NAME)


def test_unknown_models_are_refused_with_the_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=MODEL_NAME):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match=MODEL_NAME):
        prepare_model("gpt-99")


async def test_an_engine_whose_model_is_missing_fails_with_the_cause(tmp_path: Path) -> None:
    engine = EmbeddedEngine(str(tmp_path / "nowhere"))

    with pytest.raises(EngineUnavailableError, match=r"failed to start: model .*nowhere"):
        await engine.start()
    assert engine.status.state is EngineState.FAILED
    assert "nowhere" in str(engine.status)
    with pytest.raises(EngineUnavailableError):
        await engine.chat({"messages": [{"role": "user", "content": "hi"}]}, "after-failure")
    await engine.stop()
