"""Requests waiting for their grammar to compile, outside the scheduler so the batch runs on.

A constrained request is validated when it arrives, then parked here until its compile future
is done; at the top of a step the ready ones join the scheduler with their own matcher, and the
ones whose grammar failed end with ``invalid_request``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import llguidance

from scheduler.params import RequestParams
from scheduler.sequence import TextStream


@dataclass(slots=True)
class Waiting:
    """A request as ``Scheduler.add`` will take it, and its grammar's compile future."""

    request_id: str
    prompt_ids: list[int]
    params: RequestParams
    forced_output_ids: list[int]
    text: TextStream
    grammar: Future[llguidance.LLMatcher]


class GrammarWaits:
    def __init__(self) -> None:
        self._waiting: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def add(self, waiting: Waiting) -> None:
        self._waiting[waiting.request_id] = waiting

    def remove(self, request_id: str) -> Waiting | None:
        return self._waiting.pop(request_id, None)

    def wait(self, timeout_s: float) -> None:
        """Block until some grammar is ready or ``timeout_s`` passes (an engine with nothing
        else to run sleeps here instead of spinning)."""
        futures = [w.grammar for w in self._waiting.values()]
        concurrent.futures.wait(futures, timeout_s, concurrent.futures.FIRST_COMPLETED)

    def take_ready(self) -> Iterator[Waiting]:
        """The requests whose grammar finished compiling (or failed), in arrival order."""
        for waiting in [w for w in self._waiting.values() if w.grammar.done()]:
            del self._waiting[waiting.request_id]
            yield waiting
