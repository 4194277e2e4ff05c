"""OpenAI embeddings requests in and responses out, for engines started with vLLM's pooling runner."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy

from runtime.errors import InvalidRequestError

_MAX_INPUTS = 256


def parse_embedding_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    """The inputs to embed, each a string or a list of token ids (OpenAI also accepts a bare one of either)."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'input' must be a string, a list of strings or a list of token id lists", "input")
    if len(value) > _MAX_INPUTS:
        raise InvalidRequestError(f"'input' takes at most {_MAX_INPUTS} items", "input")
    for item in value:
        if not (isinstance(item, str) and item) and not (isinstance(item, list) and item and all(map(_is_token, item))):
            raise InvalidRequestError("each 'input' item must be a non-empty string or list of token ids", "input")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise InvalidRequestError("'dimensions' is not supported by the embedded model runtime", "dimensions",
                                  "unsupported_parameter")
    return value


def embedding_response(model: str, vectors: Sequence[Any], prompt_tokens: int, encoding_format: str = "float") -> dict[str, Any]:
    """`vectors` are 1-d float tensors or arrays; base64 is little-endian float32, as OpenAI sends it."""
    data = [
        {"object": "embedding", "index": index, "embedding": _encode(numpy.asarray(vector), encoding_format)}
        for index, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _encode(vector: numpy.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(float).tolist()


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
