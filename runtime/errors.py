"""Typed errors of the embedded runtime; the gateway maps each to an OpenAI-shaped HTTP error."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of every error this package raises on purpose."""


class ModelNotFoundError(RuntimeFailure):
    """The name is neither in the catalog nor a Hugging Face folder (configuration error)."""


class ModelNotPreparedError(RuntimeFailure):
    """A catalog model whose folder has not been prepared yet (`lockgate models prepare NAME`)."""


class InvalidRequestError(RuntimeFailure):
    """The request cannot be served as given (HTTP 400); `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class EngineUnavailableError(RuntimeFailure):
    """The engine is starting, stopped or failed (HTTP 503); `state` is the engine state at the time."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state
