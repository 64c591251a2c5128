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

from helix_daemon.engine.outputs import RequestOutput
from helix_daemon.engine_host.messages import AddCommand, Rejection, StepResult


class HeadStarts:
    """Sequences started before their claim, and the engine's outputs for them so far."""

    def __init__(self, add: Callable[[AddCommand], None], abort: Callable[[str], None]) -> None:
        self._add = add
        self._abort = abort
        # engine id -> what the engine said about the sequence so far: (outputs, rejections)
        self._held: dict[str, tuple[list[RequestOutput], list[Rejection]]] = {}

    def start(self, command: AddCommand) -> str:
        self._held[command.engine_id] = ([], [])
        self._add(command)
        return command.engine_id

    def hold(self, result: StepResult) -> None:
        """Move the outputs and rejections of head-started sequences out of ``result``."""
        if not self._held:
            return
        outputs: list[RequestOutput] = []
        rejected: list[Rejection] = []
        for output in result.outputs:
            held = self._held.get(output.request_id)
            (outputs if held is None else held[0]).append(output)
        for rejection in result.rejected:
            held = self._held.get(rejection.engine_id)
            (rejected if held is None else held[1]).append(rejection)
        result.outputs, result.rejected = outputs, rejected

    def adopt(self, engine_id: str) -> tuple[list[RequestOutput], list[Rejection]]:
        """The claim said go: stop holding; return what the engine produced meanwhile."""
        return self._held.pop(engine_id)

    def drop(self, engine_id: str) -> None:
        """The claim said no (or failed): abort the sequence unless it was adopted."""
        if self._held.pop(engine_id, None) is not None:
            self._abort(engine_id)
