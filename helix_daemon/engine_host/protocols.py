"""The shapes the engine host works with, as ``Protocol``s, so that none of it imports the engine.

- ``StepEngine``: what the step loop drives (the real ``helix_daemon.engine.engine.Engine``, or
  a scripted fake in tests).
- ``EngineHandle``: what a daemon holds of its engine, wherever the engine runs
  (``EngineThread``, ``EngineProcess``).
- ``CommandSink`` / ``CommandSource``: the two ends of the command channel.
- ``StepClock``: when the running step started, shared with whoever watches for a stall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from helix_daemon.engine.chat import ChatPrompt
from helix_daemon.engine.outputs import EngineInfo, EngineStats, RequestOutput
from helix_daemon.engine_host.messages import AddCommand, Command
from scheduler.params import RequestParams


class StepEngine(Protocol):
    """A synchronous, single-threaded engine: requests in, one batch of outputs per ``step``."""

    def add_request(self, request_id: str, prompt: str | Sequence[int] | ChatPrompt,
                    params: RequestParams, forced_output_ids: Sequence[int] = ()) -> None:
        """Queue a request; raises ``HelixRequestError`` for one it will not take."""
        ...

    def abort(self, request_id: str) -> bool:
        """Drop a request; False when it was not there (finished, or never added)."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one iteration; one output per request it changed."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def info(self) -> EngineInfo: ...


class EngineHandle(Protocol):
    """What a daemon holds of its engine: commands in, ``info`` once loaded; every step's result
    reaches the daemon through the callback the handle was built with."""

    @property
    def info(self) -> EngineInfo | None:
        """None until the engine is loaded (then set once, never changed)."""
        ...

    def add(self, command: AddCommand) -> None: ...

    def abort(self, engine_id: str) -> None: ...

    def start(self) -> None:
        """Start the engine (may block while the model loads: call off the event loop)."""
        ...

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the engine finish its step and end (blocks: call off the event loop)."""
        ...

    def kill(self) -> None:
        """End the engine without waiting for it."""
        ...

    def is_stalled(self, stall_s: float) -> bool:
        """True while one step has been running longer than ``stall_s`` (a hung device)."""
        ...


class CommandSink(Protocol):
    """Where a daemon sends commands: a ``queue.SimpleQueue`` read by the engine's thread, or
    the engine process's pipe (``command_pipe.CommandWriter``, or a ``multiprocessing.Queue``)."""

    def put(self, command: Command, /) -> None: ...


class CommandSource(Protocol):
    """Where the engine's loop takes commands from; both raise ``queue.Empty`` when none came."""

    def get(self, block: bool = True, timeout: float | None = None) -> Command: ...

    def get_nowait(self) -> Command: ...


class StepClock(Protocol):
    """When the running step started (``time.monotonic()``; 0.0: none). A ``ctypes.c_double`` in
    shared memory when the engine is a process of its own."""

    value: float
