"""The inference table: one ClickHouse row per request, written in the background, spooled when ClickHouse is away.

Names load on first use: the writer process imports this package for `child` alone, and must not pay for the
gateway's side of the writer (Prometheus metrics, the pipe's threads) nor the gateway for the ClickHouse driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.inference.rows import COLUMNS, to_row, truncate_payload
    from gateway.inference.store import connect, migrate
    from gateway.inference.usage import report
    from gateway.inference.writer import InferenceQueryError, InferenceWriter

_MODULES = {
    "COLUMNS": "rows",
    "to_row": "rows",
    "truncate_payload": "rows",
    "connect": "store",
    "migrate": "store",
    "report": "usage",
    "InferenceQueryError": "writer",
    "InferenceWriter": "writer",
}

__all__ = [
    "COLUMNS",
    "InferenceQueryError",
    "InferenceWriter",
    "connect",
    "migrate",
    "report",
    "to_row",
    "truncate_payload",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
