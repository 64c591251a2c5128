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
_MARK = "\ue000\ue001"  # private-use characters: where a text chunk's text goes
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


async def sse_body(shape: Shape, first: list[ChoiceEvent],
                   rest: AsyncIterator[list[ChoiceEvent]], metrics: GatewayMetrics,
                   started_s: float) -> AsyncIterator[bytes]:
    """The SSE bytes of a stream whose first events are already known (not an error); a Redis
    outage mid-stream ends it with an error chunk (its entries live on in the queue)."""
    writer = _ChunkWriter(shape, metrics, started_s)
    try:
        async for batch in _prepend(first, rest):
            data = writer.write(batch)
            if data:
                yield data
            if writer.ended:
                return
    except redis.RedisError as e:
        error = APIError(503, f"Redis is unavailable: {e}", "service_unavailable",
                         code="redis_unavailable")
        yield sse(error.body()) + DONE
        return
    tail = sse(shape.usage_chunk(writer.usage.to_dict())) if shape.include_usage else b""
    yield tail + DONE


class _ChunkWriter:
    """Events to chunks. The text of one choice's token events that arrived together goes out
    as one chunk (OpenAI's chunks may carry several tokens)."""

    def __init__(self, shape: Shape, metrics: GatewayMetrics, started_s: float) -> None:
        self.shape = shape
        self.metrics = metrics
        self.started_s = started_s
        self.usage = UsageTotal()
        self.ended = False  # an error ended the stream
        self._opened: set[int] = set()
        self._first_token_seen = False
        self._around: dict[int, tuple[bytes, bytes] | None] = {}  # see _text_chunk

    def write(self, batch: list[ChoiceEvent]) -> bytes:
        out: list[bytes] = []
        pending: dict[int, list[str]] = {}  # choice index -> texts not yet written
        num_tokens = 0
        for choice, event in batch:
            if choice.index not in self._opened and self.shape.is_chat:
                self._opened.add(choice.index)
                out.append(sse(self.shape.chunk(choice.index, first=True)))
            if isinstance(event, TokenEvent):
                pending.setdefault(choice.index, []).append(event.text)
                num_tokens += len(event.ids)
                continue
            self._flush(out, pending, choice.index)
            if isinstance(event, DoneEvent):
                self.usage.add(choice, event.usage)
                out.append(sse(self.shape.chunk(choice.index,
                                                finish_reason=event.finish_reason)))
            elif isinstance(event, (ErrorEvent, CancelledEvent)):
                self.ended = True
                out.append(sse(from_event(event).body()) + DONE)
                self._count(num_tokens)
                return b"".join(out)
        for index in list(pending):
            self._flush(out, pending, index)
        self._count(num_tokens)
        return b"".join(out)

    def _flush(self, out: list[bytes], pending: dict[int, list[str]], index: int) -> None:
        text = "".join(pending.pop(index, ()))
        if text:
            out.append(self._text_chunk(index, text))

    def _text_chunk(self, index: int, text: str) -> bytes:
        """``sse(shape.chunk(index, text))``, built around the text: a choice's text chunks
        differ only in their text, so the bytes before and after it are encoded once (from a
        chunk holding a mark) and each chunk costs one string encode, not a dict's."""
        if index not in self._around:
            parts = sse(self.shape.chunk(index, _MARK)).split(_encode(_MARK))
            self._around[index] = (parts[0], parts[1]) if len(parts) == 2 else None
        around = self._around[index]
        if around is None:  # the mark is in the model name: build the chunk whole
            return sse(self.shape.chunk(index, text))
        return around[0] + _encode(text) + around[1]

    def _count(self, num_tokens: int) -> None:
        if not num_tokens:
            return
        self.metrics.tokens.inc(num_tokens)
        if not self._first_token_seen:
            self._first_token_seen = True
            self.metrics.ttft.observe(time.perf_counter() - self.started_s)


async def _prepend(first: list[ChoiceEvent], rest: AsyncIterator[list[ChoiceEvent]]
                   ) -> AsyncIterator[list[ChoiceEvent]]:
    yield first
    async for batch in rest:
        yield batch


class SSEResponse(StreamingResponse):
    """A stream that watches for the client's disconnect while it waits for tokens (not only
    when a write fails), and runs ``on_close(disconnected)`` however it ends."""

    def __init__(self, body: AsyncIterator[bytes],
                 on_close: Callable[[bool], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = True  # unless the whole stream was written
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    nonlocal disconnected
                    with contextlib.suppress(OSError):  # the client went away during a write
                        await self.stream_response(send)
                        disconnected = False
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._body.aclose()  # type: ignore[attr-defined]  # an async generator
                await self._on_close(disconnected)
