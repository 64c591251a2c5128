"""The engine in a process of its own, behind the same interface as ``EngineWorker``.

In one process the engine's Python (scheduling, sampling, detokenising: most of a step for a
small model) and the event loop's Redis work take turns on one GIL, so every event written
lengthens a step. Here they run in parallel, as vLLM's engine core does: commands go to the
child through a pipe the loop writes without blocking (``command_pipe.py``; on Windows a
``multiprocessing.Queue``, whose feeder thread pickles), step results come back through a pipe
that a reader thread hands to the loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.outputs import EngineInfo
from helix_daemon.engine_host import command_pipe
from helix_daemon.engine_host.command_pipe import CommandReader, CommandWriter
from helix_daemon.engine_host.load import load_engine
from helix_daemon.engine_host.messages import StepResult, StopCommand
from helix_daemon.engine_host.worker import EngineHandle, EngineWorker, stalled


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or died."""


class EngineProcess(EngineHandle):
    """Starts ``load_engine(config)`` in a spawned child; ``start()`` blocks until it is loaded."""

    def __init__(self, config: EngineConfig, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[StepResult], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        # spawn, not fork: a forked copy of a process holding torch's and the loop's threads
        # can deadlock, and spawn is what macOS and Windows have anyway.
        ctx = multiprocessing.get_context("spawn")
        self._child_ends: list[multiprocessing.connection.Connection] = []  # closed once sent
        child_commands: Any
        if command_pipe.supported():
            child_end, self._command_end = ctx.Pipe(duplex=False)
            self._child_ends.append(child_end)
            child_commands = CommandReader(child_end)
            self._commands: Any = None  # a CommandWriter, opened on the loop by start()
        else:
            child_commands = self._commands = ctx.Queue()
            # Commands still buffered when the child is gone must not keep this process from
            # exiting (the queue's feeder thread would wait for room in a pipe nobody reads).
            self._commands.cancel_join_thread()
        self._results, child_results = ctx.Pipe(duplex=False)
        self._child_ends.append(child_results)
        self._clock = ctx.RawValue("d", 0.0)  # the running step's start, 0.0 = none
        self._process = ctx.Process(target=_child_main, name="helix-engine", daemon=True,
                                    args=(config, child_commands, child_results, self._clock))
        self._reader = threading.Thread(target=self._read, name="helix-engine-reader",
                                        daemon=True)
        self._stopping = False
        self.info: EngineInfo | None = None
        self.stats: Any = None
        # At interpreter exit multiprocessing SIGTERMs daemonic children, then joins them; the
        # engine ignores SIGTERM, so one still running then is killed first (a daemon that
        # crashed out of its shutdown must still exit).
        multiprocessing.util.Finalize(self, _kill_if_alive, args=(self._process,),
                                      exitpriority=10)

    def start(self) -> None:
        """Spawn the child and wait until its model is loaded (slow: call off the loop)."""
        if self._stopping:
            raise EngineProcessError("stopped before the engine process started")
        if self._commands is None:
            self._commands = asyncio.run_coroutine_threadsafe(
                CommandWriter.open(self._command_end), self._loop).result()
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
        if isinstance(hello, BaseException):
            self._process.join(5)
            raise EngineProcessError(f"engine failed to load: {hello}") from hello
        self.info, self.stats = hello
        self._reader.start()

    def kill(self) -> None:
        """End the child now (a stop while the model loads, or a daemon that ended abruptly)."""
        self._stopping = True
        _kill_if_alive(self._process)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the child finish its step and exit; kill it if it does not within the timeout."""
        self._stopping = True
        if self._process.is_alive() and self._reader.is_alive():  # else nobody reads its results
            self._commands.put(StopCommand())
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
        while True:
            try:
                result: StepResult = self._results.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                self._process.join(5)
                result = StepResult(fatal=EngineProcessError(
                    f"engine process died (exit code {self._process.exitcode})"))
            except Exception as e:  # a result that does not unpickle: nothing after it is sure
                result = StepResult(fatal=EngineProcessError(f"engine result unreadable: {e!r}"))
            if result.stats is not None:
                self.stats = result.stats
            try:
                self._loop.call_soon_threadsafe(self._deliver, result)
            except RuntimeError:  # the loop is closed: the daemon is gone
                return
            if result.fatal is not None:
                return


def _kill_if_alive(process: multiprocessing.process.BaseProcess) -> None:
    if process.pid is not None and process.is_alive():
        process.kill()


def _child_main(config: EngineConfig, commands: Any,
                results: multiprocessing.connection.Connection, clock: Any) -> None:
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
    results.send((engine.info(), engine.stats()))

    def publish(result: StepResult) -> None:
        if result.fatal is not None:  # not every exception pickles
            result.fatal = EngineProcessError(f"{type(result.fatal).__name__}: {result.fatal}")
        results.send(result)

    EngineWorker(engine, publish, commands=commands, clock=clock).run()


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
