"""Commands to the engine process through a pipe that the event loop writes itself.

A ``multiprocessing.Queue`` hands each command to a feeder thread, which must wake and win the
GIL from the loop (busy sending the request's claim) before the command is on its way: on a
2-core VM that put 0.8 ms between the daemon reading a request and the engine seeing it, against
0.4 ms here. The loop writes through an asyncio pipe transport, which writes at once while the
pipe has room and buffers the rest without blocking; the engine reads length-prefixed pickles.
POSIX event loops only: on Windows' proactor loop the daemon keeps the queue.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.connection
import os
import pickle
import queue
import struct
import threading
from collections.abc import Callable

from helix_daemon.engine_host.messages import Command, StopCommand

_HEADER = struct.Struct("!Q")  # payload length


def supported() -> bool:
    return os.name == "posix"


class CommandWriter:
    """Parent side: ``put`` never blocks; from another thread it goes through the loop."""

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop
                 ) -> None:
        self._transport = transport
        self._loop = loop
        self._loop_thread = threading.get_ident()

    @classmethod
    async def open(cls, conn: multiprocessing.connection.Connection) -> CommandWriter:
        """Take over the write end of a ``multiprocessing.Pipe`` (called on the loop)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, conn)
        return cls(transport, loop)

    def put(self, command: Command) -> None:
        payload = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        self._on_loop(functools.partial(self._transport.write,
                                        _HEADER.pack(len(payload)) + payload))

    def close(self) -> None:
        """Close once what is buffered is written (the transport flushes before it closes)."""
        self._on_loop(self._transport.close)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` now on the loop's thread, else through the loop: a transport belongs to
        its loop's thread."""
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)


class CommandReader:
    """Child side: the ``CommandSource`` the engine's loop drains. A closed pipe (the daemon
    is gone) reads as the stop command."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn  # owns the file descriptor

    def get(self, block: bool = True, timeout: float | None = None) -> Command:
        if not multiprocessing.connection.wait([self._conn], timeout if block else 0):
            raise queue.Empty
        try:
            [length] = _HEADER.unpack(self._read(_HEADER.size))
            command: Command = pickle.loads(self._read(length))  # what CommandWriter.put wrote
            return command
        except EOFError:
            return StopCommand()

    def get_nowait(self) -> Command:
        return self.get(block=False)

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = os.read(self._conn.fileno(), min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
