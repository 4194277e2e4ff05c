"""OpenAI's Files API for batches: upload (multipart, streamed to disk), retrieve, content, delete, list.

A file belongs to the user who uploaded it: anyone else is told it does not exist; the admins see every file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, web

from gateway.api.common import current_policy, json_response
from gateway.batch.retention import expires_at
from gateway.batch.store import BatchStore, after_cursor, new_file_id, owner_of, read_page
from gateway.compiled import CompiledPolicy
from gateway.errors import GatewayError, bad_request
from gateway.proxy import authenticate
from policies.keys import Principal

BATCH_STORE: web.AppKey[BatchStore] = web.AppKey("batch_store", BatchStore)
# Uploads leave the loop in pieces this large: few thread hops, little memory per upload.
_WRITE_BYTES = 1024 * 1024
_READ_BYTES = 64 * 1024
_MAX_PARTS = 16
_MAX_FIELD_BYTES = 4096
_MAX_FILENAME_CHARS = 255
_MULTIPART_SLACK_BYTES = 64 * 1024
MAX_FILES_LISTED = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    policy: CompiledPolicy
    principal: Principal
    admin: bool

    def may_see(self, record: dict) -> bool:
        return self.admin or record["owner"]["user"] == self.principal.user


async def caller(request: web.Request) -> Caller:
    policy = current_policy(request)
    principal = await authenticate(request, policy)
    return Caller(policy, principal, policy.governance.authorizer.is_admin(principal))


def no_such(kind: str, object_id: str, param: str = "id") -> GatewayError:
    return GatewayError(404, f"No such {kind} object: {object_id[:80]}", "invalid_request_error", "not_found", param)


def file_view(file: dict, who: Caller) -> dict:
    """The File object clients see: it expires when retention deletes it, by the policy as it is now."""
    return {**file, "expires_at": expires_at(file, who.policy.loaded.policy.batch.retention_days)}


def list_object(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def page_limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise bad_request(f"'limit' must be an integer from 1 to {most}.", "limit", "invalid_value")
    return limit


async def _owned_file(request: web.Request) -> tuple[Caller, dict]:
    who = await caller(request)
    file_id = request.match_info["file_id"]
    record = await asyncio.to_thread(request.app[BATCH_STORE].read_file, file_id)
    if record is None or not who.may_see(record):
        raise no_such("File", file_id)
    return who, record


async def create_file(request: web.Request) -> web.Response:
    try:
        who = await caller(request)
        file = await _receive(request, request.app[BATCH_STORE], who)
    except GatewayError as err:
        return err.response()
    return json_response(file_view(file, who))


async def retrieve_file(request: web.Request) -> web.Response:
    try:
        who, record = await _owned_file(request)
    except GatewayError as err:
        return err.response()
    return json_response(file_view(record["file"], who))


async def file_content(request: web.Request) -> web.StreamResponse:
    try:
        _, record = await _owned_file(request)
    except GatewayError as err:
        return err.response()
    path = request.app[BATCH_STORE].data_path(record["file"]["id"])
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    try:
        _, record = await _owned_file(request)
    except GatewayError as err:
        return err.response()
    file_id = record["file"]["id"]
    if not await asyncio.to_thread(request.app[BATCH_STORE].delete_file, file_id):
        return no_such("File", file_id).response()
    return json_response({"id": file_id, "object": "file", "deleted": True})


async def list_files(request: web.Request) -> web.Response:
    try:
        who = await caller(request)
        limit = page_limit(request, MAX_FILES_LISTED, MAX_FILES_LISTED)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("'order' must be 'asc' or 'desc'.", "order", "invalid_value")
    except GatewayError as err:
        return err.response()
    purpose, after = request.query.get("purpose"), request.query.get("after")
    found, more = await asyncio.to_thread(_page, request.app[BATCH_STORE], who, purpose, after, order == "desc", limit)
    return json_response(list_object(found, more))


def _page(store: BatchStore, who: Caller, purpose: str | None, after: str | None, newest_first: bool,
          limit: int) -> tuple[list[dict], bool]:
    ids = store.file_ids()
    if newest_first:
        ids.reverse()

    def keep(record: dict) -> bool:
        return who.may_see(record) and (purpose is None or record["file"]["purpose"] == purpose)

    records, more = read_page(after_cursor(ids, after, newest_first), store.read_file, keep, limit)
    return [file_view(record["file"], who) for record in records], more


class _Upload:
    """The file part as it arrives, written to its place in the store's upload folder off the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._handle: int | None = None

    async def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= _WRITE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        if self._handle is None:
            self._handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(self._handle, view):]

    def close(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The file is larger than the limit of {limit} bytes.", "invalid_request_error",
                        "file_too_large", "file")


async def _read_field(part: BodyPartReader, timeout_s: float) -> str:
    data = b""
    while chunk := await asyncio.wait_for(part.read_chunk(_READ_BYTES), timeout_s):
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise bad_request(f"The form field '{part.name}' is longer than {_MAX_FIELD_BYTES} bytes.", part.name)
    return data.decode("utf-8", "replace")


async def _receive(request: web.Request, store: BatchStore, who: Caller) -> dict:
    config = who.policy.loaded.policy.batch
    timeout_s = who.policy.loaded.policy.server.body_timeout_s
    limit = config.max_file_bytes
    if not request.content_type.startswith("multipart/form-data"):
        raise bad_request("Upload the file as multipart/form-data with the fields 'purpose' and 'file'.")
    if request.content_length is not None and request.content_length > limit + _MULTIPART_SLACK_BYTES:
        raise _too_large(limit)
    file_id = new_file_id()
    upload: _Upload | None = None
    purpose: str | None = None
    filename = "upload.jsonl"
    try:
        reader = await request.multipart()
        for _ in range(_MAX_PARTS):
            part = await asyncio.wait_for(reader.next(), timeout_s)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise bad_request("The form must not nest multipart bodies.")
            if part.name == "file" and upload is None:
                filename = (part.filename or filename)[:_MAX_FILENAME_CHARS]
                upload = _Upload(await asyncio.to_thread(store.upload_path, file_id))
                while chunk := await asyncio.wait_for(part.read_chunk(_READ_BYTES), timeout_s):
                    if upload.size + len(chunk) > limit:
                        raise _too_large(limit)
                    await upload.add(chunk)
                await upload.flush()
            elif part.name == "purpose":
                purpose = await _read_field(part, timeout_s)
            else:
                await _read_field(part, timeout_s)
        else:
            raise bad_request(f"The form has more than {_MAX_PARTS} fields.")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if purpose != "batch":
            raise bad_request(f"'{purpose[:64]}' is not a supported purpose: this gateway stores files for 'batch'.",
                              "purpose", "invalid_value")
        if upload is None:
            raise bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        upload.close()
        file = {"id": file_id, "object": "file", "bytes": upload.size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                "expires_at": None}
        await asyncio.to_thread(store.commit_file, upload.path, file, owner_of(who.principal))
        upload = None
        return file
    except TimeoutError:
        raise GatewayError(408, f"The upload stalled for more than {timeout_s:g} s.", "invalid_request_error",
                           "request_timeout") from None
    except ValueError as exc:
        # aiohttp's multipart reader refuses a malformed body with ValueError (and its subclasses).
        raise bad_request(f"The multipart body is malformed: {str(exc)[:200]}") from None
    finally:
        if upload is not None:
            await asyncio.to_thread(upload.discard)
