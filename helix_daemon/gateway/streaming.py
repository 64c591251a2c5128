"""Server-sent events exactly as OpenAI sends them, and what happens when a client goes away.

A stream is ``data: {json}\\n\\n`` chunks, then ``data: [DONE]\\n\\n``. Chat streams open each
choice with a ``{"role": "assistant", "content": ""}`` delta and close it with an empty delta
carrying ``finish_reason``; with ``stream_options.include_usage`` every chunk has ``"usage":
null`` and one last chunk with no choices carries the usage. An error after the stream started
is sent as a chunk holding OpenAI's error object (as vLLM does), then ``[DONE]``.

A client that disconnects, mid-stream or while its request is still queued, has its queue
entries cancelled at once (``meta.cancel`` + PUBLISH), so the daemon frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import msgspec
import redis
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from helix_daemon.gateway.errors import APIError, from_event
from helix_daemon.gateway.follow import ChoiceEvent
from helix_daemon.gateway.metrics import GatewayMetrics
from helix_daemon.gateway.translate import Shape, UsageTotal
from helix_daemon.wire.protocol import CancelledEvent, DoneEvent, ErrorEvent, TokenEvent

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; raise ClientGone (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse_body(shape: Shape, first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent],
                   metrics: GatewayMetrics, started_s: float) -> AsyncIterator[bytes]:
    """The SSE bytes of a stream whose first event is already known (not an error); a Redis
    outage mid-stream ends it with an error chunk (its entries live on in the queue)."""
    try:
        async for data in _sse_events(shape, first, rest, metrics, started_s):
            yield data
    except redis.RedisError as e:
        error = APIError(503, f"Redis is unavailable: {e}", "service_unavailable",
                         code="redis_unavailable")
        yield sse(error.body()) + DONE


async def _sse_events(shape: Shape, first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent],
                      metrics: GatewayMetrics, started_s: float) -> AsyncIterator[bytes]:
    usage = UsageTotal()
    opened: set[int] = set()
    first_token_seen = False
    async for choice, event in _prepend(first, rest):
        out = b""
        if choice.index not in opened and shape.is_chat:
            opened.add(choice.index)
            out = sse(shape.chunk(choice.index, first=True))
        if isinstance(event, TokenEvent):
            if event.text:
                out += sse(shape.chunk(choice.index, event.text))
            metrics.tokens.inc(len(event.ids))
            if not first_token_seen:
                first_token_seen = True
                metrics.ttft.observe(time.perf_counter() - started_s)
        elif isinstance(event, DoneEvent):
            usage.add(choice, event.usage)
            out += sse(shape.chunk(choice.index, finish_reason=event.finish_reason))
        elif isinstance(event, (ErrorEvent, CancelledEvent)):
            yield out + sse(from_event(event).body()) + DONE
            return
        if out:
            yield out
    tail = sse(shape.usage_chunk(usage.to_dict())) if shape.include_usage else b""
    yield tail + DONE


async def _prepend(first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent]
                   ) -> AsyncIterator[ChoiceEvent]:
    yield first
    async for item in rest:
        yield item


class SSEResponse(StreamingResponse):
    """A stream that watches for the client's disconnect while it waits for tokens (not only
    when a write fails), and runs ``on_close`` however it ends."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
                 ) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away during a write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._body.aclose()  # type: ignore[attr-defined]  # an async generator
                await self._on_close()
