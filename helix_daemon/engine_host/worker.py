"""The engine's loop: commands in through a queue, one ``StepResult`` out per step.

The engine is synchronous and not thread-safe, so exactly one thread touches it: a thread of the
daemon (``EngineWorker.start``) or the main thread of an engine process (``engine_process.py``,
``EngineWorker.run``). The asyncio side never waits on a forward pass: it enqueues
``add``/``abort`` commands (drained at the top of each step) and gets every step's result through
``publish``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from helix_daemon.engine.outputs import EngineInfo
from helix_daemon.engine_host.messages import (
    AbortCommand,
    AddCommand,
    Command,
    Rejection,
    StepResult,
    StopCommand,
)
from scheduler.errors import HelixRequestError

_IDLE_WAIT_S = 0.05  # how long an idle engine waits for a command before looking again


class CommandSink(Protocol):
    """Where a daemon sends commands: a ``queue.SimpleQueue`` read by the engine's thread, or
    the engine process's pipe (``command_pipe.CommandWriter``, or a ``multiprocessing.Queue``)."""

    def put(self, item: Command) -> None: ...


class CommandSource(Protocol):
    """Where the engine's loop takes commands from."""

    def get(self, block: bool = True, timeout: float | None = None) -> Command: ...
    def get_nowait(self) -> Command: ...


class StepClock(Protocol):
    """When the running step started (0.0: none); shared memory when the engine is a process."""

    value: float


class _Clock:
    value = 0.0


def stalled(clock: StepClock, stall_s: float) -> bool:
    """True while one step has been running longer than ``stall_s`` (a hung device)."""
    started = clock.value
    return started > 0.0 and time.monotonic() - started > stall_s


class EngineHandle:
    """What a daemon holds of its engine, wherever the engine runs: commands in, ``info`` and
    the latest ``stats`` out (subclasses: ``EngineWorker``, ``EngineProcess``)."""

    _commands: CommandSink
    info: EngineInfo | None  # None until the engine is loaded
    stats: Any  # EngineStats after the latest step

    def add(self, command: AddCommand) -> None:
        self._commands.put(command)

    def abort(self, engine_id: str) -> None:
        self._commands.put(AbortCommand(engine_id))

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the engine finish its step and end (blocks: call off the loop)."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the engine without waiting for it."""
        raise NotImplementedError

    def is_stalled(self, stall_s: float) -> bool:
        raise NotImplementedError


class EngineWorker(EngineHandle):
    """Runs ``engine.step()`` while there is work and publishes each step's result."""

    def __init__(self, engine: Any, publish: Callable[[StepResult], None],
                 commands: CommandSource | None = None, clock: StepClock | None = None) -> None:
        self.engine = engine
        self.info: EngineInfo | None = engine.info()
        self._publish = publish
        own: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._commands = own  # what add/abort/kill put, when the engine runs in this thread
        self._source: CommandSource = commands if commands is not None else own
        self._clock: StepClock = clock if clock is not None else _Clock()
        self._thread = threading.Thread(target=self.run, name="helix-engine", daemon=True)
        self.stats: Any = engine.stats()  # replaced (never mutated) after every iteration

    @classmethod
    def on_loop(cls, engine: Any, loop: asyncio.AbstractEventLoop,
                deliver: Callable[[StepResult], None]) -> EngineWorker:
        """A worker whose results are handed to ``deliver`` on the event loop."""
        return cls(engine, lambda result: loop.call_soon_threadsafe(deliver, result))

    def start(self) -> None:
        """Run the engine in a thread of its own."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.kill()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def kill(self) -> None:
        """A thread cannot be killed: it stops after its current step."""
        self._commands.put(StopCommand())

    def is_stalled(self, stall_s: float) -> bool:
        return stalled(self._clock, stall_s)

    # --- the engine's thread ----------------------------------------------------------------

    def run(self) -> None:
        """Step until told to stop (or the engine breaks)."""
        published = self.stats
        while True:
            result = StepResult()
            if not self._drain(result):
                return
            try:
                result.outputs = self._step()
                result.stats = self.stats = self.engine.stats()
            except Exception as e:  # the engine itself broke: nothing more can run here
                result.fatal = e
            # A step without outputs still counts when it changed the stats: an abort that
            # freed KV blocks must reach a daemon that stopped pulling because the pool was full.
            if result.outputs or result.rejected or result.fatal or result.stats != published:
                published = result.stats
                self._publish(result)
            if result.fatal:
                return

    def _drain(self, result: StepResult) -> bool:
        """Apply queued commands; block briefly only when the engine has nothing to do."""
        block = not self.engine.has_unfinished()
        while True:
            try:
                command = self._source.get(timeout=_IDLE_WAIT_S) if block \
                    else self._source.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(command, StopCommand):
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
            result.rejected.append(Rejection(command.engine_id, e.code, str(e)))
        except Exception as e:  # a request the engine cannot take must not stop the others
            result.rejected.append(
                Rejection(command.engine_id, "engine_error", f"{type(e).__name__}: {e}"))

    def _step(self) -> list[Any]:
        if not self.engine.has_unfinished():
            return []
        self._clock.value = time.monotonic()
        try:
            return self.engine.step()
        finally:
            self._clock.value = 0.0
