"""The engine's loop: commands in through a ``CommandSource``, one ``StepResult`` out per step.

The engine is synchronous and not thread-safe, so exactly one thread runs this loop and touches
the engine: a thread of the daemon (``EngineThread``) or the main thread of an engine process
(``EngineProcess``). The asyncio side never waits on a forward pass: it sends ``add``/``abort``
commands (drained at the top of each step) and gets every step's result through ``publish``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from helix_daemon.engine.outputs import EngineStats, RequestOutput
from helix_daemon.engine_host.messages import (
    AbortCommand,
    AddCommand,
    Rejection,
    StepResult,
    StopCommand,
)
from helix_daemon.engine_host.protocols import CommandSource, StepClock, StepEngine
from scheduler.errors import HelixRequestError

_IDLE_WAIT_S = 0.05  # how long an idle engine waits for a command before looking again


class LocalClock:
    """A ``StepClock`` for an engine in a thread of the daemon."""

    def __init__(self) -> None:
        self.value = 0.0


def stalled(clock: StepClock, stall_s: float) -> bool:
    """True while one step has been running longer than ``stall_s`` (a hung device)."""
    started = clock.value
    return started > 0.0 and time.monotonic() - started > stall_s


class EngineLoop:
    """Runs ``engine.step()`` while there is work and publishes each step's result."""

    def __init__(self, engine: StepEngine, commands: CommandSource,
                 publish: Callable[[StepResult], None], clock: StepClock) -> None:
        self._engine = engine
        self._commands = commands
        self._publish = publish
        self._clock = clock  # written here, read by whoever watches for a stall
        self._published: EngineStats | None = None  # the stats in the latest published result

    def publish_stats(self) -> None:
        """Publish the engine's stats before its first step: stats reach the daemon only in step
        results. Call it on the loop's thread, or before that thread starts."""
        self._published = self._engine.stats()
        self._publish(StepResult(stats=self._published))

    def run(self) -> None:
        """Step until told to stop (or the engine breaks)."""
        while True:
            result = StepResult()
            if not self._drain(result):
                return
            try:
                self._take_outputs(self._step(), result)
                result.stats = self._engine.stats()
            except Exception as e:  # the engine itself broke: nothing more can run here
                result.fatal = e
            # A step without outputs still counts when it changed the stats: an abort that
            # freed KV blocks must reach a daemon that stopped pulling because the pool was full.
            if result.outputs or result.rejected or result.fatal \
                    or result.stats != self._published:
                self._published = result.stats
                self._publish(result)
            if result.fatal:
                return

    def _drain(self, result: StepResult) -> bool:
        """Apply queued commands; block briefly only when the engine has nothing to do.
        False once told to stop."""
        block = not self._engine.has_unfinished()
        while True:
            try:
                command = self._commands.get(timeout=_IDLE_WAIT_S) if block \
                    else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(command, StopCommand):
                return False
            self._apply(command, result)

    def _apply(self, command: AddCommand | AbortCommand, result: StepResult) -> None:
        if isinstance(command, AbortCommand):
            self._engine.abort(command.engine_id)
            return
        try:
            self._engine.add_request(command.engine_id, command.prompt, command.params,
                                     forced_output_ids=command.forced_output_ids)
        except HelixRequestError as e:
            result.rejected.append(Rejection(command.engine_id, e.code, str(e)))
        except Exception as e:  # a request the engine cannot take must not stop the others
            result.rejected.append(
                Rejection(command.engine_id, "engine_error", f"{type(e).__name__}: {e}"))

    @staticmethod
    def _take_outputs(outputs: list[RequestOutput], result: StepResult) -> None:
        """A request the engine refused after taking it (its grammar did not compile) is
        answered as one refused when added."""
        for output in outputs:
            if output.error is None:
                result.outputs.append(output)
            else:
                result.rejected.append(
                    Rejection(output.request_id, "invalid_request", output.error))

    def _step(self) -> list[RequestOutput]:
        if not self._engine.has_unfinished():
            return []
        self._clock.value = time.monotonic()
        try:
            return self._engine.step()
        finally:
            self._clock.value = 0.0
