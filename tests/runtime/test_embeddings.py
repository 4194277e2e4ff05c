"""vLLM's pooling runner serves embeddings on the CPU (a second engine: about a minute to start here)."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy
import pytest
import pytest_asyncio

from runtime import EmbeddedEngine

pytestmark = [
    pytest.mark.runtime,
    pytest.mark.asyncio(loop_scope="session"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def embedder(model_path: Path) -> AsyncIterator[EmbeddedEngine]:
    # SmolLM2 is a causal LM; vLLM turns it into an embedding model (last-token pooling, normalized).
    engine = EmbeddedEngine(str(model_path), {"max_model_len": 512, "runner": "pooling", "convert": "embed"}, "emb")
    await engine.start()
    yield engine
    await engine.stop()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_embeddings_place_similar_texts_closer(embedder: EmbeddedEngine, tokenizer: object) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue rose by ten percent."]
    reply = await embedder.embeddings({"input": texts}, "emb-float")

    vectors = [item["embedding"] for item in reply["data"]]
    assert [item["index"] for item in reply["data"]] == [0, 1, 2]
    assert len(vectors[0]) == 576
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert reply["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(text)) for text in texts)

    encoded = await embedder.embeddings({"input": texts[0], "encoding_format": "base64"}, "emb-b64")
    decoded = numpy.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    assert numpy.allclose(decoded, vectors[0], atol=1e-6)
