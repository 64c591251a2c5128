"""The engine process's command pipe (``helix_daemon/engine_host/command_pipe.py``), between real
processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
from multiprocessing.connection import Connection

import pytest

from helix_daemon.engine_host import command_pipe
from helix_daemon.engine_host.command_pipe import CommandReader, CommandWriter
from helix_daemon.engine_host.messages import AbortCommand, AddCommand, StopCommand
from scheduler.params import RequestParams

pytestmark = pytest.mark.skipif(not command_pipe.supported(), reason="POSIX event loops only")


def _echo_commands(commands: CommandReader, replies: Connection) -> None:
    """Child: report each command read (a long prompt by its length) until the stop command."""
    while True:
        try:
            command = commands.get(timeout=30)
        except queue.Empty:
            replies.send("timed out")
            return
        if isinstance(command, AddCommand):
            replies.send(("add", command.engine_id, len(command.prompt)))
        elif isinstance(command, AbortCommand):
            replies.send(("abort", command.engine_id))
        else:
            replies.send(command)
            return


async def test_commands_arrive_whole_in_order_and_a_closed_pipe_reads_as_stop() -> None:
    """Writes made before the engine reads anything, 4 MB of them (a pipe holds 64 KiB), return
    at once on the loop; a put from another thread goes through the loop, in order; the child
    reads every command whole and in order, then the stop command once the pipe is closed."""
    ctx = multiprocessing.get_context("spawn")
    child_end, parent_end = ctx.Pipe(duplex=False)
    replies, child_replies = ctx.Pipe(duplex=False)
    writer = await CommandWriter.open(parent_end)
    long_prompt = list(range(1_000_000))
    writer.put(AddCommand("a", long_prompt, RequestParams(max_tokens=4)))  # would block if sync
    writer.put(AbortCommand("a"))
    # queued on the loop before to_thread returns, so written before the close below
    await asyncio.to_thread(writer.put, AddCommand("b", [1, 2, 3], RequestParams(max_tokens=4)))
    writer.close()

    child = ctx.Process(target=_echo_commands, args=(CommandReader(child_end), child_replies))
    child.start()
    child_end.close()
    child_replies.close()
    got = []
    while len(got) < 4:
        got.append(await asyncio.to_thread(replies.recv))
    await asyncio.to_thread(child.join, 30)
    assert got == [("add", "a", len(long_prompt)), ("abort", "a"), ("add", "b", 3), StopCommand()]
    assert child.exitcode == 0


def test_reader_without_commands_reports_empty() -> None:
    """An idle engine's timed wait ends with ``queue.Empty`` (then it looks again), and
    ``get_nowait`` does not wait at all."""
    child_end, parent_end = multiprocessing.Pipe(duplex=False)
    reader = CommandReader(child_end)
    with pytest.raises(queue.Empty):
        reader.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        reader.get_nowait()
    parent_end.close()
    assert reader.get(timeout=1) == StopCommand()  # the daemon is gone: stop
