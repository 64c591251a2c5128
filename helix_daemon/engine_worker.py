"""The engine's own thread: commands in through a queue, step results out to the event loop.

The engine is synchronous and not thread-safe, so exactly one thread touches it. The asyncio side
never waits on a forward pass: it enqueues ``add``/``abort`` commands (drained at the top of each
step) and receives one ``StepResult`` per step through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import HelixRequestError
from scheduler.params import RequestParams

_IDLE_WAIT_S = 0.05  # how long an idle engine thread waits for a command before looking again


@dataclass(frozen=True, slots=True)
class AddCommand:
    engine_id: str
    prompt: str | list[int]
    params: RequestParams
    forced_output_ids: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class AbortCommand:
    engine_id: str


@dataclass(slots=True)
class StepResult:
    """Everything one iteration produced; ``rejected`` holds (engine_id, code, message)."""

    outputs: list[Any] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    stats: Any = None
    fatal: BaseException | None = None


class EngineWorker:
    """Runs ``engine.step()`` in a dedicated thread while there is work."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[StepResult], None]) -> None:
        self.engine = engine
        self._loop = loop
        self._deliver = deliver
        self._commands: queue.SimpleQueue[AddCommand | AbortCommand | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="helix-engine", daemon=True)
        self._step_started: float | None = None
        self.last_progress = time.monotonic()
        self.stats: Any = engine.stats()  # replaced (never mutated) after every iteration

    def start(self) -> None:
        self._thread.start()

    def add(self, command: AddCommand) -> None:
        self._commands.put(command)

    def abort(self, engine_id: str) -> None:
        self._commands.put(AbortCommand(engine_id))

    def stop(self, timeout_s: float = 30.0) -> None:
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def is_stalled(self, stall_s: float) -> bool:
        """True while one step has been running longer than ``stall_s`` (a hung device)."""
        started = self._step_started
        return started is not None and time.monotonic() - started > stall_s

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            result = StepResult()
            if not self._drain(result):
                return
            try:
                result.outputs = self._step()
                result.stats = self.stats = self.engine.stats()
            except Exception as e:  # the engine itself broke: nothing more can run here
                result.fatal = e
            if result.outputs or result.rejected or result.fatal:
                self._loop.call_soon_threadsafe(self._deliver, result)
            if result.fatal:
                return

    def _drain(self, result: StepResult) -> bool:
        """Apply queued commands; block briefly only when the engine has nothing to do."""
        block = not self.engine.has_unfinished()
        while True:
            try:
                command = self._commands.get(timeout=_IDLE_WAIT_S) if block \
                    else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            self._apply(command, result)

    def _apply(self, command: AddCommand | AbortCommand, result: StepResult) -> None:
        if isinstance(command, AbortCommand):
            self.engine.abort(command.engine_id)
            return
        try:
            self.engine.add_request(command.engine_id, command.prompt, command.params,
                                    forced_output_ids=command.forced_output_ids)
        except HelixRequestError as e:
            result.rejected.append((command.engine_id, e.code, str(e)))
        except Exception as e:  # a request the engine cannot take must not stop the others
            result.rejected.append((command.engine_id, "engine_error", f"{type(e).__name__}: {e}"))

    def _step(self) -> list[Any]:
        if not self.engine.has_unfinished():
            self.last_progress = time.monotonic()
            return []
        self._step_started = time.monotonic()
        try:
            return self.engine.step()
        finally:
            self._step_started = None
            self.last_progress = time.monotonic()
