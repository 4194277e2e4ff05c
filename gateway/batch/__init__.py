"""Batch inference: OpenAI's Files and Batch APIs and `lockgate batch run`, every line through the governance
pipeline."""

from gateway.batch.job import DOORS, Line, LineError, LineResult, Slots, parse_line, run_job

__all__ = ["DOORS", "Line", "LineError", "LineResult", "Slots", "parse_line", "run_job"]
