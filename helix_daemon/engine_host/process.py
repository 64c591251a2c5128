"""The engine in a process of its own, behind the same ``EngineHandle`` as ``EngineThread``.

In one process the engine's Python (scheduling, sampling, detokenising: most of a step for a
small model) and the event loop's Redis work take turns on one GIL, so every event written
lengthens a step. Here they run in parallel, as vLLM's engine core does: commands go to the
child through a pipe the loop writes without blocking (``command_pipe.py``; on Windows a
``multiprocessing.Queue``, whose feeder thread pickles), step results come back through a pipe
that a reader thread hands to the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import multiprocessing.queues
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Protocol

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.outputs import EngineInfo
from helix_daemon.engine_host import command_pipe
from helix_daemon.engine_host.command_pipe import CommandReader, CommandWriter
from helix_daemon.engine_host.load import load_engine
from helix_daemon.engine_host.loop import EngineLoop, stalled
from helix_daemon.engine_host.messages import (
    AbortCommand,
    AddCommand,
    Command,
    StepResult,
    StopCommand,
)
from helix_daemon.engine_host.protocols import CommandSink, CommandSource, StepClock


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or died."""


class _CommandChannel(CommandSink, Protocol):
    """The daemon's end of the command channel: ``CommandWriter`` or ``multiprocessing.Queue``."""

    def close(self) -> None: ...


class EngineProcess:
    """An ``EngineHandle`` that starts ``load_engine(config)`` in a spawned child; ``start()``
    blocks until it is loaded. Each step's result is handed to ``deliver`` on ``loop``."""

    def __init__(self, config: EngineConfig, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[StepResult], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        # spawn, not fork: a forked copy of a process holding torch's and the loop's threads
        # can deadlock, and spawn is what macOS and Windows have anyway.
        ctx = multiprocessing.get_context("spawn")
        self._child_ends: list[Connection] = []  # closed once the child has its copies
        self._command_end: Connection | None = None  # the pipe's write end, until start()
        self._commands: _CommandChannel | None = None
        child_commands = self._open_commands(ctx)
        self._results, child_results = ctx.Pipe(duplex=False)
        self._child_ends.append(child_results)
        self._clock = ctx.RawValue(ctypes.c_double, 0.0)  # the running step's start, 0.0 = none
        self._process = ctx.Process(target=_child_main, name="helix-engine", daemon=True,
                                    args=(config, child_commands, child_results, self._clock))
        self._reader = threading.Thread(target=self._read, name="helix-engine-reader",
                                        daemon=True)
        self._stopping = False
        self.info: EngineInfo | None = None  # set by start(), once the child has loaded
        # At interpreter exit multiprocessing SIGTERMs daemonic children, then joins them; the
        # engine ignores SIGTERM, so one still running then is killed first (a daemon that
        # crashed out of its shutdown must still exit).
        multiprocessing.util.Finalize(self, _kill_if_alive, args=(self._process,),
                                      exitpriority=10)

    def _open_commands(self, ctx: BaseContext) -> CommandSource:
        """Make the command channel and return the child's end. Ours is ``_commands``: a
        ``multiprocessing.Queue`` now, or a pipe whose writer ``start()`` opens on the loop."""
        if command_pipe.supported():
            child_end, self._command_end = ctx.Pipe(duplex=False)
            self._child_ends.append(child_end)
            return CommandReader(child_end)
        commands: multiprocessing.queues.Queue[Command] = ctx.Queue()
        # Commands still buffered when the child is gone must not keep this process from
        # exiting (the queue's feeder thread would wait for room in a pipe nobody reads).
        commands.cancel_join_thread()
        self._commands = commands
        return commands

    def add(self, command: AddCommand) -> None:
        self._sink().put(command)

    def abort(self, engine_id: str) -> None:
        self._sink().put(AbortCommand(engine_id))

    def _sink(self) -> _CommandChannel:
        if self._commands is None:
            raise EngineProcessError("the engine process has not started")
        return self._commands

    def start(self) -> None:
        """Spawn the child and wait until its model is loaded (slow: call off the loop). The
        engine's first stats are queued for ``deliver`` before this returns."""
        if self._stopping:
            raise EngineProcessError("stopped before the engine process started")
        if self._command_end is not None:  # the transport takes the pipe's end over
            self._commands = asyncio.run_coroutine_threadsafe(
                CommandWriter.open(self._command_end), self._loop).result()
            self._command_end = None
        self._process.start()
        if self._stopping:  # kill() came while the process was being started
            self._process.kill()
        for end in self._child_ends:  # the child has its own copies; with ours closed,
            end.close()                # recv() sees EOF when the child dies
        self._child_ends = []
        try:
            hello = self._results.recv()
        except EOFError:
            self._process.join(5)
            raise EngineProcessError(
                f"engine process exited while loading (exit code {self._process.exitcode})"
            ) from None
        if not isinstance(hello, EngineInfo):  # the child's load failed (an exception)
            self._process.join(5)
            cause = hello if isinstance(hello, BaseException) else None
            raise EngineProcessError(f"engine failed to load: {hello}") from cause
        self.info = hello
        first = self._receive()  # the stats before any step (EngineLoop.publish_stats)
        if first is not None and self._hand_over(first):
            self._reader.start()

    def kill(self) -> None:
        """End the child now (a stop while the model loads, or a daemon that ended abruptly)."""
        self._stopping = True
        _kill_if_alive(self._process)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the child finish its step and exit; kill it if it does not within the timeout."""
        self._stopping = True
        if self._process.is_alive() and self._reader.is_alive():  # else nobody reads its results
            self._sink().put(StopCommand())
            self._process.join(timeout_s)
        _kill_if_alive(self._process)
        if self._process.pid is not None:
            self._process.join(5)
        if self._reader.is_alive():
            self._reader.join(5)
        if self._commands is not None:
            self._commands.close()

    def is_stalled(self, stall_s: float) -> bool:
        # A reader that died leaves the child blocked in send(), outside any step.
        return stalled(self._clock, stall_s) or (self.info is not None
                                                 and not self._reader.is_alive())

    def _read(self) -> None:
        """Reader thread: hand each step's result to the loop; a vanished child is fatal."""
        while (result := self._receive()) is not None and self._hand_over(result):
            pass

    def _hand_over(self, result: StepResult) -> bool:
        """Queue ``deliver(result)`` on the loop; False once nothing more is to be read."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, result)
        except RuntimeError:  # the loop is closed: the daemon is gone
            return False
        return result.fatal is None

    def _receive(self) -> StepResult | None:
        """The child's next step result; None once the child was stopped."""
        try:
            result = self._results.recv()
        except (EOFError, OSError):
            if self._stopping:
                return None
            self._process.join(5)
            return StepResult(fatal=EngineProcessError(
                f"engine process died (exit code {self._process.exitcode})"))
        except Exception as e:  # a result that does not unpickle: nothing after it is sure
            return StepResult(fatal=EngineProcessError(f"engine result unreadable: {e!r}"))
        if not isinstance(result, StepResult):
            return StepResult(fatal=EngineProcessError(f"engine sent {type(result).__name__}"))
        return result


def _kill_if_alive(process: BaseProcess) -> None:
    if process.pid is not None and process.is_alive():
        process.kill()


def _child_main(config: EngineConfig, commands: CommandSource, results: Connection,
                clock: StepClock) -> None:
    """The engine process: load the model, then step until told to stop."""
    # Signals meant for the daemon also reach its process group (Ctrl-C, systemd's stop): the
    # daemon drains, then stops its engine, which must keep stepping until then.
    for sig in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_IGN)
    _exit_with_parent()
    try:
        engine = load_engine(config)
    except Exception as e:  # the daemon reports it and exits
        results.send(EngineProcessError(f"{type(e).__name__}: {e}"))
        return
    results.send(engine.info())

    def publish(result: StepResult) -> None:
        if result.fatal is not None:  # not every exception pickles
            result.fatal = EngineProcessError(f"{type(result.fatal).__name__}: {result.fatal}")
        results.send(result)

    loop = EngineLoop(engine, commands, publish, clock)
    loop.publish_stats()
    loop.run()


def _exit_with_parent() -> None:
    """A daemon killed with SIGKILL cannot stop its engine: the engine notices and exits.

    (While stepping it would also fail to send; an idle engine only waits for commands. The
    command pipe reads as a stop once the daemon is gone, but Windows' command queue never
    reports its writer gone, since the child holds a copy of it.)
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="helix-parent-watch", daemon=True).start()
