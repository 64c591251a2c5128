"""The gateway's SSE writer on its own (I/O-free): events that arrive together become as few
chunks as OpenAI's format allows, in each choice's order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from helix_daemon.gateway.follow import ChoiceEvent
from helix_daemon.gateway.metrics import GatewayMetrics
from helix_daemon.gateway.schemas import ChatCompletionRequest, CompletionRequest, Request
from helix_daemon.gateway.streaming import DONE, sse, sse_body
from helix_daemon.gateway.translate import Shape, UsageTotal, to_choices
from helix_daemon.wire.protocol import DoneEvent, Timings, TokenEvent, Usage


def _done(seq: int) -> DoneEvent:
    return DoneEvent(seq, 1, "length", Usage(5, 3), Timings(0.0, 0.0, 1.0, None, 1))


def _chunks(data: bytes) -> list[dict[str, Any]]:
    events = data.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]


def _body(shape: Shape, first: list[ChoiceEvent], rest: list[list[ChoiceEvent]]) -> bytes:
    async def later() -> AsyncIterator[list[ChoiceEvent]]:
        for batch in rest:
            yield batch

    async def collect() -> bytes:
        return b"".join([part async for part in sse_body(shape, first, later(),
                                                         GatewayMetrics(), 0.0)])

    return asyncio.run(collect())


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

    chunks = _chunks(_body(Shape(req, "r1"), batch, []))
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


def test_text_chunks_have_the_bytes_of_the_chunk_object_encoded_whole() -> None:
    """A text chunk built around its text (the rest encoded once per choice) is byte for byte
    the chunk object encoded whole: chat and completions, with and without usage, texts that
    need escaping, and a model name holding the writer's own mark (built whole then)."""
    texts = ['say "hi"\n', "back\\slash", "\u00e9\u6f22\U0001f642", "\ue000\ue001", "\t"]
    messages = [{"role": "user", "content": "hi"}]
    requests: list[Request] = [
        ChatCompletionRequest(model="m", messages=messages, stream=True),
        ChatCompletionRequest(model="m", messages=messages, stream=True,
                              stream_options={"include_usage": True}),
        CompletionRequest(model="m\ue000\ue001", prompt="x", stream=True),
        CompletionRequest(model="m", prompt="x", stream=True,
                          stream_options={"include_usage": True})]
    for req in requests:
        shape = Shape(req, "r1")
        choice = to_choices(req, 16, 4)[0]
        batches = [[(choice, TokenEvent(i, 1, i, text, [i]))] for i, text in enumerate(texts)]
        expected = [sse(shape.chunk(0, first=True))] if shape.is_chat else []
        expected += [sse(shape.chunk(0, text)) for text in texts]
        if shape.include_usage:
            expected.append(sse(shape.usage_chunk(UsageTotal().to_dict())))
        assert _body(shape, batches[0], batches[1:]) == b"".join(expected) + DONE
