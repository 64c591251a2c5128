"""The engine in a thread of the daemon: for an engine the caller built, and for benchmarks.

The thread runs an ``EngineLoop``; this handle owns that thread and the queue its commands come
through. Engine and daemon share one GIL here; ``EngineProcess`` is the default for that reason.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from helix_daemon.engine.outputs import EngineInfo
from helix_daemon.engine_host.loop import EngineLoop, LocalClock, stalled
from helix_daemon.engine_host.messages import (
    AbortCommand,
    AddCommand,
    Command,
    StepResult,
    StopCommand,
)
from helix_daemon.engine_host.protocols import StepEngine


class EngineThread:
    """An ``EngineHandle`` whose engine steps in a daemon thread; ``publish`` runs in that
    thread once per step that produced something."""

    def __init__(self, engine: StepEngine, publish: Callable[[StepResult], None]) -> None:
        self.info: EngineInfo = engine.info()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._clock = LocalClock()
        self._engine_loop = EngineLoop(engine, self._commands, publish, self._clock)
        self._thread = threading.Thread(target=self._engine_loop.run, name="helix-engine",
                                        daemon=True)

    @classmethod
    def on_loop(cls, engine: StepEngine, loop: asyncio.AbstractEventLoop,
                deliver: Callable[[StepResult], None]) -> EngineThread:
        """A handle whose step results are handed to ``deliver`` on the event loop."""

        def publish(result: StepResult) -> None:
            loop.call_soon_threadsafe(deliver, result)

        return cls(engine, publish)

    def add(self, command: AddCommand) -> None:
        self._commands.put(command)

    def abort(self, engine_id: str) -> None:
        self._commands.put(AbortCommand(engine_id))

    def start(self) -> None:
        """Publish the engine's stats, then start stepping: the daemon has the stats before it
        sees this return (``deliver`` was queued on the loop first)."""
        self._engine_loop.publish_stats()  # the engine thread does not exist yet
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
