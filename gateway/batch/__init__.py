"""Batch inference: OpenAI's Files and Batch APIs and `lockgate batch run`, every line through the governance
pipeline."""

from gateway.batch.job import DOORS, Line, LineError, LineResult, Slots, parse_line, run_job
from gateway.batch.runner import BatchRunner, validate_input
from gateway.batch.store import BatchStore

__all__ = ["DOORS", "BatchRunner", "BatchStore", "Line", "LineError", "LineResult", "Slots", "parse_line", "run_job",
           "validate_input"]
