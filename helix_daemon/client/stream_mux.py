"""One blocking XREAD for every out stream an async client follows.

A reader per request, each blocked in its own ``XREAD``, costs a round trip, a connection and a
reply parse per request per engine step: with a hundred requests streaming at once the client
spends more CPU than the daemon. The mux keeps one ``XREAD ... STREAMS k1 k2 ... id1 id2 ...``
blocked on a dedicated connection; one reply carries every stream's new events, which are handed
to the followers' queues. A stream followed while the read is blocked wakes it with
``CLIENT UNBLOCK`` (sent from another connection), so its events are not held back until the
block times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.typing import KeyT, StreamIdT

from helix_daemon.wire.protocol import is_terminal
from helix_daemon.wire.retry import REDIS_ERRORS, backoff

if TYPE_CHECKING:
    from helix_daemon.client.core import StreamReader
    from helix_daemon.wire.protocol import Event

# Failed reads in a row before the followers hear of it (on top of redis-py's own retries of a
# command: a blocked XREAD whose connection drops is not retried by redis-py).
_MAX_READ_RETRIES = 3


@dataclass
class _Follower:
    reader: StreamReader
    inbox: asyncio.Queue[list[Event] | BaseException] = field(default_factory=asyncio.Queue)


class StreamMux:
    """Follows many streams with one blocking ``XREAD`` on a connection of its own."""

    def __init__(self, client: aioredis.Redis, read_count: int) -> None:
        self._client = client
        self._read_count = read_count
        self._followers: dict[str, _Follower] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None  # the redis-py Connection the shared read blocks on
        self._conn_id: int | None = None  # its client id (None while it reconnects)
        self._read_no = 0  # counts reads sent; a wake-up is for the read it was sent during
        self._blocked = False  # a read is in flight
        self._wake_sent = False
        self._closed = False

    def is_following(self, key: str) -> bool:
        return key in self._followers

    async def follow(self, key: str, reader: StreamReader) -> AsyncIterator[list[Event]]:
        """Yield the events of ``key`` that ``reader`` lets through, up to the terminal one, in
        the lists that one read delivered together.

        Raises TimeoutError when the reader's deadline passes before the terminal event, and
        whatever the shared read raised (a lost connection, a gap that persists).
        """
        if self._closed:
            raise redis.ConnectionError("the client was closed")
        follower = _Follower(reader)
        self._followers[key] = follower
        self._ensure_reading()
        # One timer for the whole stream (a wait_for per event would cost a task each time).
        timeout_s = reader.seconds_left()
        timer = None if timeout_s is None else asyncio.get_running_loop().call_later(
            timeout_s, follower.inbox.put_nowait,
            TimeoutError(f"no terminal event for request {reader.request_id!r} in time"))
        try:
            while True:
                item = await follower.inbox.get()
                if isinstance(item, BaseException):
                    raise copy.copy(item)  # one exception object raised in many tasks would
                    # collect every task's traceback
                yield item  # never empty, and nothing after a terminal event (reader.take)
                if is_terminal(item[-1]):
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if self._followers.get(key) is follower:
                del self._followers[key]

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _ensure_reading(self) -> None:
        """Start the read loop, or wake its blocked read so that it takes the new stream."""
        if self._task is None:
            self._task = asyncio.create_task(self._read_loop())
        elif self._blocked and not self._wake_sent:
            self._wake_sent = True
            asyncio.create_task(self._unblock(self._read_no))

    async def _unblock(self, read_no: int) -> None:
        for _ in range(3):
            conn_id = self._conn_id
            if read_no != self._read_no or not self._blocked or conn_id is None:
                return  # that read is over (or reconnecting): the next one has the new stream
            with contextlib.suppress(redis.RedisError):  # a lost link ends the read anyway
                if await self._client.client_unblock(conn_id):
                    return
            await asyncio.sleep(0.001)  # the read may not have reached the server yet

    async def _read_loop(self) -> None:
        conn = self._client.client()  # one connection of the pool, held by this loop
        failures = 0
        try:
            await conn.initialize()
            self._conn = conn.connection
            # A dropped connection is opened again by its next command, under a new client id
            # that CLIENT UNBLOCK must name.
            self._conn.register_connect_callback(self._on_connect)
            self._conn_id = await conn.client_id()
            # Block for less than the socket timeout (redis-py's default is 5 s): a timed-out
            # socket is closed and opened again, which costs a round trip and a new client id.
            socket_timeout = getattr(self._conn, "socket_timeout", None)
            max_block_ms = max(1, int(socket_timeout * 800)) if socket_timeout else 2**31
            while self._followers:
                try:
                    reply = await self._read(conn, max_block_ms)
                except REDIS_ERRORS:
                    # Reading again from each stream's last id loses nothing.
                    self._conn_id = None
                    if failures >= _MAX_READ_RETRIES:
                        raise
                    await asyncio.sleep(backoff(failures))
                    failures += 1
                    continue
                failures = 0
                self._deliver(reply)
        except Exception as exc:  # every follower hears of it; the next follow() starts afresh
            self._fail_all(exc)
        except asyncio.CancelledError:  # the client is closing
            self._fail_all(redis.ConnectionError("the client was closed"))
            raise
        finally:
            if self._conn is not None:
                self._conn.deregister_connect_callback(self._on_connect)
            self._conn, self._conn_id, self._blocked = None, None, False
            if self._task is asyncio.current_task():
                self._task = None
            await conn.aclose()

    async def _on_connect(self, connection: Any) -> None:
        if connection is not self._conn:
            return  # the connection went back to the pool and serves someone else now
        await connection.send_command("CLIENT", "ID")
        self._conn_id = int(await connection.read_response())

    def _fail_all(self, exc: BaseException) -> None:
        for follower in self._followers.values():
            follower.inbox.put_nowait(exc)
        self._followers.clear()

    async def _read(self, conn: aioredis.Redis, max_block_ms: int) -> Any:
        streams: dict[KeyT, StreamIdT] = {
            key: f.reader.last_id for key, f in self._followers.items()}
        block_ms = min([f.reader.block_ms() for f in self._followers.values()] + [max_block_ms])
        self._read_no += 1
        self._blocked, self._wake_sent = True, False
        try:
            return await conn.xread(streams, count=self._read_count, block=block_ms)
        except redis.TimeoutError:
            return None  # the socket timed out first (a slow server): same as no news
        finally:
            self._blocked = False

    def _deliver(self, reply: Any) -> None:
        for raw_key, entries in reply or ():
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            follower = self._followers.get(key)
            if follower is None:  # stopped following while the read was out
                continue
            try:
                events = follower.reader.take([(raw_key, entries)])
            except Exception as exc:  # a gap that persists: this follower's error alone
                del self._followers[key]
                follower.inbox.put_nowait(exc)
                continue
            if events:
                follower.inbox.put_nowait(events)
            if follower.reader.finished:  # the rest is in its inbox: stop reading the key
                del self._followers[key]
