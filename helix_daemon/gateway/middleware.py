"""ASGI middleware: the request-size limit (checked before anything is parsed or sent to Redis)
and the request counter of ``/metrics``."""

from __future__ import annotations

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helix_daemon.gateway.errors import APIError
from helix_daemon.gateway.metrics import GatewayMetrics

# Paths counted by name; any other (a model id, a typo) is "other", so labels stay few.
_COUNTED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})


class BodyLimit:
    """Refuse (413) a body above ``max_bytes`` (``max_file_bytes`` for a file upload): at
    once from its Content-Length, or as soon as a chunked body passes the limit. The body is
    read here and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_file_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes + 64 * 1024  # room for the multipart framing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_file_bytes if scope["path"] == "/v1/files" else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(send, limit)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        error = APIError(413, f"the request body is larger than {limit} bytes",
                         code="request_too_large")
        body = msgspec.json.encode(error.body())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Count every response by route path and status code."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in _COUNTED else "other"
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
