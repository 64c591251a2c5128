"""The FastAPI app: routes, authentication, error bodies; ``/docs`` documents it."""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import redis
from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from helix_daemon.client import AsyncHelixClient
from helix_daemon.gateway.batch.api import batch_routes
from helix_daemon.gateway.batch.files import FileStore
from helix_daemon.gateway.batch.store import BatchStore
from helix_daemon.gateway.batch.worker import BatchWorker
from helix_daemon.gateway.batch.worker import stop as stop_worker
from helix_daemon.gateway.config import GatewayConfig
from helix_daemon.gateway.errors import APIError
from helix_daemon.gateway.metrics import CONTENT_TYPE
from helix_daemon.gateway.middleware import BodyLimit, CountRequests
from helix_daemon.gateway.schemas import ChatCompletionRequest, CompletionRequest, validation_error
from helix_daemon.gateway.service import Gateway

_encode = msgspec.json.Encoder().encode


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app; its Redis client opens with the app's lifespan and closes with it."""
    client = AsyncHelixClient.from_url(config.redis_url, prefix=config.prefix,
                                       max_connections=config.redis_max_connections)
    gateway = Gateway(config, client)
    files, batches = FileStore(client.redis, config.prefix), BatchStore(client.redis, config.prefix)
    worker = BatchWorker(client, gateway.routes, files, batches, config.default_max_tokens,
                         window=config.batch_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(worker.run()) if config.batch_worker else None
        try:
            yield
        finally:
            if task is not None:
                await stop_worker(task)
            await client.aclose()

    app = FastAPI(title="Helix gateway", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible HTTP API over Helix's Redis queue.")
    app.state.gateway = gateway
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.RedisError, _redis_error)  # type: ignore[arg-type]
    v1 = _v1(gateway, config.api_keys)
    v1.include_router(batch_routes(files, batches, config.max_file_bytes, _json))
    app.include_router(v1)
    _add_ops(app, gateway)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes,
                       max_file_bytes=config.max_file_bytes)
    app.add_middleware(CountRequests, metrics=gateway.metrics)
    return app


def _v1(gateway: Gateway, api_keys: tuple[str, ...]) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(api_keys))])

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: HTTPRequest) -> Response:
        return await gateway.complete(req, http)

    @router.post("/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest) -> Response:
        return await gateway.complete(req, http)

    @router.get("/models")
    async def list_models() -> Response:
        return _json(await gateway.models())

    @router.get("/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        for entry in (await gateway.models())["data"]:
            if entry["id"] == model:
                return _json(entry)
        raise APIError(404, f"The model {model!r} does not exist", param="model",
                       code="model_not_found")

    return router


def _add_ops(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 while Redis answers (with the number of live daemons), else 503."""
        live = await gateway.routes.live(fresh=True)
        return _json({"status": "ok", "daemons": len(live.beats)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)


def _authorizer(api_keys: tuple[str, ...]) -> Any:
    keys = [key.encode() for key in api_keys]

    async def authorize(http: HTTPRequest) -> None:
        if not keys:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: "
                           "Bearer <key>'", code="invalid_api_key")
        # compare_digest against every key: the time taken says nothing about which matched
        if not sum(hmac.compare_digest(token.strip().encode(), key) for key in keys):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    return authorize


def _version() -> str:
    try:
        return importlib.metadata.version("helix-llm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0.1.0"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_encode(obj), status_code=status, media_type="application/json")


async def _api_error(_: HTTPRequest, error: APIError) -> Response:
    return _json(error.body(), error.status)


async def _validation_error(_: HTTPRequest, error: RequestValidationError) -> Response:
    api_error = validation_error(list(error.errors()))
    return _json(api_error.body(), api_error.status)


async def _redis_error(_: HTTPRequest, error: redis.RedisError) -> Response:
    return JSONResponse(APIError(503, f"Redis is unavailable: {error}", "service_unavailable",
                                 code="redis_unavailable").body(), status_code=503)
