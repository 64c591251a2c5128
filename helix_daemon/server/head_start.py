"""Head starts: a new request goes to the engine while its claim is still on its way to Redis.

An entry read from the queue for the first time is, nearly always, a request nobody has run: the
claim will answer ``ok`` with nothing streamed yet. Waiting for that answer before the prefill
would add a Redis round trip to every time to first token, so the daemon hands the request to the
engine at once, under an engine id of its own, and holds whatever the engine says about it until
the claim decides: the attempt adopts the sequence and its held outputs, or (claim refused, or
tokens already streamed so the request must resume) the sequence is aborted and the outputs
dropped. Nothing reaches the request's stream before its claim: writes are fenced by the epoch
the claim returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helix_daemon.engine_host.messages import AddCommand, StepResult

Rejection = tuple[str, str, str]  # engine id, error code, message


class HeadStarts:
    """Sequences started before their claim, and the engine's outputs for them so far."""

    def __init__(self, add: Callable[[AddCommand], None], abort: Callable[[str], None]) -> None:
        self._add = add
        self._abort = abort
        self._held: dict[str, tuple[list[Any], list[Rejection]]] = {}

    def start(self, command: AddCommand) -> str:
        self._held[command.engine_id] = ([], [])
        self._add(command)
        return command.engine_id

    def hold(self, result: StepResult) -> None:
        """Move the outputs and rejections of head-started sequences out of ``result``."""
        if self._held:
            result.outputs = self._keep(result.outputs, lambda o: o.request_id, 0)
            result.rejected = self._keep(result.rejected, lambda r: r.engine_id, 1)

    def _keep(self, items: list[Any], engine_id: Callable[[Any], str], slot: int) -> list[Any]:
        """The items not held; held ones go to slot ``slot`` of their sequence's hold."""
        kept = []
        for item in items:
            held = self._held.get(engine_id(item))
            if held is None:
                kept.append(item)
            else:
                held[slot].append(item)
        return kept

    def adopt(self, engine_id: str) -> tuple[list[Any], list[Rejection]]:
        """The claim said go: stop holding; return what the engine produced meanwhile."""
        return self._held.pop(engine_id)

    def drop(self, engine_id: str) -> None:
        """The claim said no (or failed): abort the sequence unless it was adopted."""
        if self._held.pop(engine_id, None) is not None:
            self._abort(engine_id)
