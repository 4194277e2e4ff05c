"""Typed errors of the embedded runtime; the gateway maps each to an OpenAI-shaped HTTP error.

Every error carries an OpenAI error `code`, so a client can tell the cases apart without reading the message.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of every error this package raises on purpose."""

    code = "runtime_error"


class ModelNotFoundError(RuntimeFailure):
    """The name is neither in the catalog nor a Hugging Face folder (configuration error)."""

    code = "model_not_found"


class ModelNotPreparedError(RuntimeFailure):
    """A catalog model whose folder has not been prepared yet (`lockgate models prepare NAME`)."""

    code = "model_not_ready"


class InvalidRequestError(RuntimeFailure):
    """The request cannot be served as given (HTTP 400); `param` names the offending field when known.

    Codes used: `invalid_value` (a field's value is wrong), `unsupported_parameter` (a field this runtime cannot
    honour), `unsupported_value` (a value it cannot honour for this model), `context_length_exceeded`.
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineUnavailableError(RuntimeFailure):
    """The engine is starting, stopped or failed (HTTP 503); `state` is the engine state at the time."""

    code = "model_not_ready"

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


def client_error(error: Exception, default_param: str | None = None) -> InvalidRequestError:
    """A vLLM client error (VLLMValidationError and kin) as ours, naming the parameter vLLM named."""
    # Their str() appends the offending value; the message alone says what is wrong.
    message = str(error.args[0]) if error.args else str(error)
    return InvalidRequestError(message, getattr(error, "parameter", None) or default_param)
