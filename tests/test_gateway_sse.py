"""The gateway's SSE writer on its own (I/O-free): events that arrive together become as few
chunks as OpenAI's format allows, in each choice's order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from helix_daemon.gateway.follow import ChoiceEvent
from helix_daemon.gateway.metrics import GatewayMetrics
from helix_daemon.gateway.schemas import ChatCompletionRequest
from helix_daemon.gateway.streaming import sse_body
from helix_daemon.gateway.translate import Shape, to_choices
from helix_daemon.wire.protocol import DoneEvent, Timings, TokenEvent, Usage


def _done(seq: int) -> DoneEvent:
    return DoneEvent(seq, 1, "length", Usage(5, 3), Timings(0.0, 0.0, 1.0, None, 1))


def _chunks(data: bytes) -> list[dict[str, Any]]:
    events = data.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]


def test_token_events_that_arrive_together_make_one_chunk_per_choice() -> None:
    """Two choices' token events in one batch: each choice gets its role chunk, one content
    chunk with its texts joined in order, and its finish chunk; usage counts both outputs."""
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2,
                                stream=True, stream_options={"include_usage": True})
    a, b = to_choices(req, 16, 4)
    batch: list[ChoiceEvent] = [
        (a, TokenEvent(0, 1, 0, "Hel", [1])), (b, TokenEvent(0, 1, 0, "Wor", [2])),
        (a, TokenEvent(1, 1, 1, "lo", [3, 4])), (b, TokenEvent(1, 1, 1, "ld", [5])),
        (a, _done(2)), (b, _done(2))]

    async def collect() -> bytes:
        async def nothing() -> AsyncIterator[list[ChoiceEvent]]:
            for _ in ():
                yield []

        parts = [part async for part in sse_body(Shape(req, "r1"), batch, nothing(),
                                                 GatewayMetrics(), 0.0)]
        return b"".join(parts)

    chunks = _chunks(asyncio.run(collect()))
    deltas = [(c["choices"][0]["index"], c["choices"][0]["delta"],
               c["choices"][0]["finish_reason"]) for c in chunks if c["choices"]]
    assert deltas == [
        (0, {"role": "assistant", "content": ""}, None),
        (1, {"role": "assistant", "content": ""}, None),
        (0, {"content": "Hello"}, None),
        (0, {}, "length"),
        (1, {"content": "World"}, None),
        (1, {}, "length"),
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
