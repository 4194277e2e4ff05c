"""The embedded model runtime: vLLM engines started, fed and stopped inside the gateway process.

The gateway's embedded provider holds one `EmbeddedEngine` per policy provider and calls its
`chat` / `completions` / `stream_chat` / `stream_completions` with plain OpenAI request dicts.
"""

from runtime.engine import EmbeddedEngine, EngineLoad, EngineState, EngineStatus
from runtime.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotPreparedError,
    RuntimeFailure,
)
from runtime.models import CATALOG, ModelInfo, list_models, model_dir, prepare_model, resolve_model

__all__ = [
    "CATALOG",
    "EmbeddedEngine",
    "EngineLoad",
    "EngineState",
    "EngineStatus",
    "EngineUnavailableError",
    "InvalidRequestError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelNotPreparedError",
    "RuntimeFailure",
    "list_models",
    "model_dir",
    "prepare_model",
    "resolve_model",
]
