"""The HTTP routes of the Batch API: ``/v1/files`` and ``/v1/batches``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from helix_daemon.gateway.batch.files import FileStore
from helix_daemon.gateway.batch.lines import ENDPOINTS
from helix_daemon.gateway.batch.store import BatchStore
from helix_daemon.gateway.errors import APIError, invalid


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


def batch_routes(files: FileStore, batches: BatchStore, max_file_bytes: int,
                 json_response: Any) -> APIRouter:
    """The routes, to be included in the authenticated ``/v1`` router."""
    router = APIRouter()

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

    @router.get("/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return json_response(_found(await files.get(file_id), "file", file_id))

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        data = await files.content(file_id)
        return Response(_found(data, "file", file_id), media_type="application/jsonl")

    @router.post("/batches")
    async def create_batch(req: CreateBatch) -> Response:
        if req.endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
        _found(await files.get(req.input_file_id), "file", req.input_file_id)
        return json_response(await batches.create(req.input_file_id, req.endpoint,
                                                  req.completion_window, req.metadata))

    @router.get("/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        return json_response(_found(await batches.get(batch_id), "batch", batch_id))

    @router.get("/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> Response:
        limit = max(1, min(limit, 100))
        found = await batches.recent(after, limit + 1)  # one more says whether there are more
        page = found[:limit]
        return json_response({"object": "list", "data": page,
                              "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None,
                              "has_more": len(found) > limit})

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        _found(await batches.get(batch_id), "batch", batch_id)
        await batches.transition(batch_id, "cancelling", "validating", "in_progress")
        return json_response(await batches.get(batch_id))

    return router


def _found(value: Any, kind: str, name: str) -> Any:
    if value is None:
        raise APIError(404, f"No such {kind}: {name!r}", param=f"{kind}_id",
                       code=f"{kind}_not_found")
    return value
