"""The inference table: one ClickHouse row per request, written in the background, spooled when ClickHouse is away."""

from gateway.inference.rows import COLUMNS, to_row, truncate_payload
from gateway.inference.store import connect, engine_sharing_problem, migrate
from gateway.inference.usage import report
from gateway.inference.writer import InferenceQueryError, InferenceWriter

__all__ = [
    "COLUMNS",
    "InferenceQueryError",
    "InferenceWriter",
    "connect",
    "engine_sharing_problem",
    "migrate",
    "report",
    "to_row",
    "truncate_payload",
]
