"""One real vLLM engine on the CPU, started once for the whole test run, serving the small catalog model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from runtime import EmbeddedEngine, model_dir, prepare_model

MODEL_NAME = "smollm2-135m-instruct"
# The store `make model` (`lockgate models prepare`) fills: the model is converted once per user, not per checkout.
MODEL_DIR = model_dir()
MAX_MODEL_LEN = 1024
# Two sequences at a time makes queueing (and so priority order) observable with short answers.
MAX_NUM_SEQS = 2


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The prepared model folder; converted on the first run, reused from the model store afterwards."""
    return prepare_model(MODEL_NAME, MODEL_DIR / MODEL_NAME)


@pytest.fixture(scope="session")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def processes_before_engine() -> set[int]:
    """Children the test process already had (a Redis server of other suites, say): not the engine's."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(model_path: Path, processes_before_engine: set[int]) -> AsyncIterator[EmbeddedEngine]:
    served = EmbeddedEngine(
        str(model_path), {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS}, served_model_name="small"
    )
    await served.start()
    yield served
    await served.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_shutdown.py stops the shared engine, so it runs after every other test that may use it."""
    items.sort(key=lambda item: item.path.name == "test_shutdown.py")
