"""The HTTP routes of the Batch API: ``/v1/files`` and ``/v1/batches``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from helix_daemon.gateway.batch.files import FileStore
from helix_daemon.gateway.batch.lines import ENDPOINTS
from helix_daemon.gateway.batch.store import BatchStore, parse_window
from helix_daemon.gateway.errors import APIError, invalid


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str  # "24h" as OpenAI; Helix also takes shorter ones (parse_window)
    metadata: dict[str, str] | None = None


def batch_routes(files: FileStore, batches: BatchStore, max_file_bytes: int,
                 json_response: Any) -> APIRouter:
    """The routes, to be included in the authenticated ``/v1`` router."""
    router = APIRouter()
    _file_routes(router, files, batches, max_file_bytes, json_response)
    _batch_routes(router, files, batches, json_response)
    return router


def _file_routes(router: APIRouter, files: FileStore, batches: BatchStore, max_file_bytes: int,
                 json_response: Any) -> None:
    @router.post("/files")
    async def create_file(file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> Response:
        if purpose != "batch":
            raise invalid("only purpose 'batch' is supported", "purpose")
        data = await file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise APIError(413, f"files are limited to {max_file_bytes} bytes",
                           code="file_too_large")
        return json_response(await files.create(data, file.filename or "batch.jsonl", purpose))

    @router.get("/files")
    async def list_files(purpose: str | None = None, limit: int = 10_000,
                         order: Literal["asc", "desc"] = "desc",
                         after: str | None = None) -> Response:
        page, has_more = await files.list(purpose, max(1, min(limit, 10_000)), order, after)
        return json_response(_page(page, has_more))

    @router.get("/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return json_response(_found(await files.get(file_id), "file", file_id))

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        _found(await files.get(file_id), "file", file_id)
        await _check_unused(batches, file_id)
        deleted = await files.delete(file_id)
        return json_response({"id": file_id, "object": "file", "deleted": deleted})

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        data = await files.content(file_id)
        return Response(_found(data, "file", file_id), media_type="application/jsonl")


def _batch_routes(router: APIRouter, files: FileStore, batches: BatchStore,
                  json_response: Any) -> None:
    @router.post("/batches")
    async def create_batch(req: CreateBatch) -> Response:
        if req.endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
        try:
            parse_window(req.completion_window)
        except ValueError as e:
            raise invalid(str(e), "completion_window") from None
        _found(await files.get(req.input_file_id), "file", req.input_file_id)
        return json_response(_public(await batches.create(
            req.input_file_id, req.endpoint, req.completion_window, req.metadata)))

    @router.get("/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        return json_response(_public(_found(await batches.get(batch_id), "batch", batch_id)))

    @router.get("/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> Response:
        limit = max(1, min(limit, 100))
        found = await batches.recent(after, limit + 1)  # one more says whether there are more
        return json_response(_page([_public(b) for b in found[:limit]], len(found) > limit))

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        _found(await batches.get(batch_id), "batch", batch_id)
        await batches.transition(batch_id, "cancelling", "validating", "in_progress")
        return json_response(_public(await batches.get(batch_id)))


async def _check_unused(batches: BatchStore, file_id: str) -> None:
    """409 if ``file_id`` is the input of a batch that has not ended: a replica taking the
    batch over reads it again."""
    for batch_id in await batches.active():
        batch = await batches.get(batch_id)
        if batch is not None and batch["input_file_id"] == file_id:
            raise APIError(409, f"the file is the input of {batch_id}, which has not ended",
                           param="file_id", code="file_in_use")


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _public(batch: Any) -> Any:
    """A batch as clients see it: ``expiring`` is Helix's own step (OpenAI's statuses, and the
    enums of typed SDKs, have no such value); until it is ``expired`` it reads ``in_progress``."""
    if batch is not None and batch["status"] == "expiring":
        return batch | {"status": "in_progress"}
    return batch


def _found(value: Any, kind: str, name: str) -> Any:
    if value is None:
        raise APIError(404, f"No such {kind}: {name!r}", param=f"{kind}_id",
                       code=f"{kind}_not_found")
    return value
