"""``Gateway``: one OpenAI request end to end: validate, route, enqueue, then answer with the
whole completion or an SSE stream."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from helix_daemon.client import AsyncHelixClient, build_request
from helix_daemon.gateway.config import GatewayConfig
from helix_daemon.gateway.errors import APIError, from_event, invalid
from helix_daemon.gateway.follow import Submitted
from helix_daemon.gateway.metrics import GatewayMetrics
from helix_daemon.gateway.routes import ModelRoutes
from helix_daemon.gateway.schemas import Request, check_supported
from helix_daemon.gateway.streaming import ClientGone, SSEResponse, sse_body, unless_disconnected
from helix_daemon.gateway.translate import Choice, Shape, UsageTotal, to_choices
from helix_daemon.wire.protocol import CancelledEvent, DoneEvent, ErrorEvent, TokenEvent, queue_key
from scheduler.errors import InvalidRequestError

_encode = msgspec.json.Encoder().encode
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the client


class Gateway:
    """What the HTTP handlers call; holds the Redis client, the routes and the metrics."""

    def __init__(self, config: GatewayConfig, client: AsyncHelixClient) -> None:
        self.config = config
        self.client = client
        self.routes = ModelRoutes(client.redis, config.prefix, config.routes, config.route_ttl_s)
        self.metrics = GatewayMetrics()

    async def complete(self, req: Request, http: HTTPRequest) -> Response:
        """``/v1/chat/completions`` and ``/v1/completions``."""
        started_s = time.perf_counter()
        choices = self._choices(req)
        queue = await self.routes.resolve(req.model)
        await self._check_depth(queue)
        submitted = await Submitted.submit(self.client, queue, choices)
        shape = Shape(req, submitted.request_ids[0])
        if req.stream:
            return await self._stream(shape, submitted, http, started_s)
        return await self._whole(shape, submitted, http)

    def _choices(self, req: Request) -> list[Choice]:
        check_supported(req)
        choices = to_choices(req, self.config.default_max_tokens, self.config.max_n)
        try:
            for choice in choices:  # as the daemon will validate them: a 400 here, not later
                build_request(**choice.body)
        except InvalidRequestError as e:
            raise invalid(str(e)) from None
        return choices

    async def _check_depth(self, queue: str) -> None:
        bound = self.config.max_queue_depth
        if bound and await self.client.redis.xlen(queue_key(queue, self.config.prefix)) >= bound:
            raise APIError(429, f"the queue of this model holds {bound} or more requests; "
                           "retry later", "rate_limit_error", code="queue_full")

    async def _stream(self, shape: Shape, submitted: Submitted, http: HTTPRequest,
                      started_s: float) -> Response:
        batches = submitted.batches()
        try:  # the first event decides the status: an error before any token is an HTTP error
            first = await unless_disconnected(http.receive, batches.__anext__())
        except ClientGone:
            await self._gone(submitted)
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            await submitted.cancel_open()
            raise
        event = first[0][1]
        if isinstance(event, (ErrorEvent, CancelledEvent)):
            await batches.aclose()
            await submitted.cancel_open()
            raise from_event(event)
        self.metrics.open_streams.inc()

        async def on_close(disconnected: bool) -> None:
            self.metrics.open_streams.dec()
            if disconnected:
                await self._gone(submitted)
            else:  # an error event ended the stream: its other choices are of no use now
                await submitted.cancel_open()

        body = sse_body(shape, first, batches, self.metrics, started_s)
        return SSEResponse(body, on_close)

    async def _whole(self, shape: Shape, submitted: Submitted, http: HTTPRequest) -> Response:
        try:
            answer = await unless_disconnected(http.receive, self._collect(shape, submitted))
        except ClientGone:
            await self._gone(submitted)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            await submitted.cancel_open()  # only those an error left running
        return Response(_encode(answer), media_type="application/json")

    async def _collect(self, shape: Shape, submitted: Submitted) -> dict[str, Any]:
        texts: list[list[str]] = [[] for _ in submitted.choices]
        reasons = [""] * len(submitted.choices)
        usage = UsageTotal()
        async for choice, event in submitted.events():
            if isinstance(event, TokenEvent):
                texts[choice.index].append(event.text)
                self.metrics.tokens.inc(len(event.ids))
            elif isinstance(event, DoneEvent):
                reasons[choice.index] = event.finish_reason
                usage.add(choice, event.usage)
            else:
                raise from_event(event)
        return shape.response([("".join(t), r) for t, r in zip(texts, reasons)], usage.to_dict())

    async def _gone(self, submitted: Submitted) -> None:
        if await submitted.cancel_open():
            self.metrics.cancelled.inc()

    async def models(self) -> dict[str, Any]:
        """``/v1/models``: the models of the live daemons."""
        live = await self.routes.live()
        created: dict[str, int] = {}
        for beat in live.beats:
            since_s = beat.started_ms // 1000
            created[beat.model] = min(created.get(beat.model, since_s), since_s)
        return {"object": "list",
                "data": [{"id": model, "object": "model", "created": since_s,
                          "owned_by": "helix"} for model, since_s in sorted(created.items())]}
