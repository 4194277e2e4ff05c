"""OpenAI's Batch API: create, retrieve, list, cancel. The batch runner (gateway/batch/runner.py) does the work.

A batch belongs to the user who created it: anyone else is told it does not exist; the admins see every batch.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.api.common import json_response
from gateway.api.files import BATCH_STORE, Caller, caller, list_object, no_such, page_limit
from gateway.batch.job import DOORS
from gateway.batch.store import TERMINAL, BatchStore, after_cursor, new_batch_id, owner_of, read_page
from gateway.batch.usage import UsageSums
from gateway.errors import GatewayError, bad_request
from gateway.proxy import read_body

COMPLETION_WINDOW_S = {"24h": 24 * 3600}
_MAX_METADATA_PAIRS = 16
_MAX_METADATA_KEY_CHARS = 64
_MAX_METADATA_VALUE_CHARS = 512
_DEFAULT_LISTED, _MAX_LISTED = 20, 100


def batch_view(record: dict, cancel_asked_at: float | None) -> dict:
    """The Batch object clients see: a cancel asked of a batch still running reads as `cancelling` at once, whichever
    process runs it (only the runner writes batch.json)."""
    batch = record["batch"]
    if cancel_asked_at is None or batch["status"] in TERMINAL or batch["status"] == "cancelling":
        return batch
    return {**batch, "status": "cancelling", "cancelling_at": int(cancel_asked_at)}


def _visible_view(store: BatchStore, batch_id: str, who: Caller) -> dict | None:
    record = store.read_batch(batch_id)
    if record is None or not who.may_see(record):
        return None
    return batch_view(record, store.cancel_requested_at(batch_id))


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_METADATA_PAIRS:
        raise bad_request(f"'metadata' must be an object of at most {_MAX_METADATA_PAIRS} pairs.", "metadata",
                          "invalid_value")
    for key, item in value.items():
        if len(key) > _MAX_METADATA_KEY_CHARS or not isinstance(item, str) or len(item) > _MAX_METADATA_VALUE_CHARS:
            raise bad_request(f"'metadata' keys are strings of at most {_MAX_METADATA_KEY_CHARS} characters and its "
                              f"values strings of at most {_MAX_METADATA_VALUE_CHARS}.", "metadata", "invalid_value")
    return value


async def create_batch(request: web.Request) -> web.Response:
    store = request.app[BATCH_STORE]
    try:
        who = await caller(request)
        body = await read_body(request, who.policy.loaded.policy.server)
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise bad_request("Missing required parameter: 'input_file_id'.", "input_file_id",
                              "missing_required_parameter")
        endpoint = body.get("endpoint")
        if endpoint not in DOORS:
            raise bad_request(f"'endpoint' must be one of {', '.join(DOORS)}.", "endpoint", "invalid_value")
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOW_S:
            raise bad_request("'completion_window' must be '24h'.", "completion_window", "invalid_value")
        metadata = _metadata(body.get("metadata"))
        record = await asyncio.to_thread(store.read_file, input_file_id)
        if record is None or not who.may_see(record):
            raise no_such("File", input_file_id, "input_file_id")
        if record["file"]["purpose"] != "batch":
            raise bad_request("The input file must have been uploaded with purpose 'batch'.", "input_file_id",
                              "invalid_value")
    except GatewayError as err:
        return err.response()
    now = int(time.time())
    batch = {"id": new_batch_id(), "object": "batch", "endpoint": endpoint, "errors": None,
             "input_file_id": input_file_id, "completion_window": window, "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
             "expires_at": now + COMPLETION_WINDOW_S[window], "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata, "model": None,
             "usage": UsageSums().to_object()}
    try:
        await asyncio.to_thread(store.create_batch, batch, owner_of(who.principal), input_file_id)
    except FileNotFoundError:
        # Deleted between the check and the link.
        return no_such("File", input_file_id, "input_file_id").response()
    return json_response(batch)


async def retrieve_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    try:
        who = await caller(request)
    except GatewayError as err:
        return err.response()
    view = await asyncio.to_thread(_visible_view, request.app[BATCH_STORE], batch_id, who)
    if view is None:
        return no_such("Batch", batch_id).response()
    return json_response(view)


def _page(store: BatchStore, who: Caller, after: str | None, limit: int) -> tuple[list[dict], bool]:
    records, more = read_page(after_cursor(store.batch_ids(), after, newest_first=True), store.read_batch,
                              who.may_see, limit)
    return [batch_view(record, store.cancel_requested_at(record["batch"]["id"])) for record in records], more


async def list_batches(request: web.Request) -> web.Response:
    try:
        who = await caller(request)
        limit = page_limit(request, _DEFAULT_LISTED, _MAX_LISTED)
    except GatewayError as err:
        return err.response()
    found, more = await asyncio.to_thread(_page, request.app[BATCH_STORE], who, request.query.get("after"), limit)
    return json_response(list_object(found, more))


def _cancel(store: BatchStore, batch_id: str, who: Caller) -> dict | None:
    record = store.read_batch(batch_id)
    if record is None or not who.may_see(record):
        return None
    status = record["batch"]["status"]
    if status in TERMINAL:
        if status == "cancelled":
            return record["batch"]
        raise GatewayError(409, f"Cannot cancel a batch with status '{status}'.", "invalid_request_error",
                           "batch_not_cancellable")
    return batch_view(record, store.request_cancel(batch_id))


async def cancel_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    try:
        who = await caller(request)
        view = await asyncio.to_thread(_cancel, request.app[BATCH_STORE], batch_id, who)
    except GatewayError as err:
        return err.response()
    if view is None:
        return no_such("Batch", batch_id).response()
    return json_response(view)
