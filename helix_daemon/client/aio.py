"""``AsyncHelixClient``: submit, stream, result, cancel and status over ``redis.asyncio``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from helix_daemon.client.core import (
    CANCEL_LUA,
    DEFAULT_BLOCK_MS,
    DEFAULT_URL,
    MAX_CONNECTIONS,
    QUEUED_TTL_S,
    READ_COUNT,
    RESERVE_LUA,
    QueueStatus,
    RequestResult,
    ResultBuilder,
    StreamReader,
    build_request,
    enqueue_fresh,
    meta_fields,
    parse_heartbeat,
    pick_group,
    scored_members,
    text_of,
)
from helix_daemon.client.stream_mux import StreamMux
from helix_daemon.wire.connection import async_redis
from helix_daemon.wire.protocol import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE,
    Event,
    cancel_channel,
    check_request_id,
    daemon_key,
    daemons_key,
    encode_request_fields,
    meta_key,
    out_key,
    queue_key,
)


class AsyncHelixClient:
    """Asyncio client: ``await submit(...)``, ``async for ev in stream(id)``, ``await result()``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue = queue
        self._cancel = client.register_script(CANCEL_LUA)
        self._reserve = client.register_script(RESERVE_LUA)
        self._mux = StreamMux(client, READ_COUNT)

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE, **redis_kwargs: Any) -> AsyncHelixClient:
        """Connect to ``url``; ``redis_kwargs`` go to ``redis.asyncio.Redis.from_url``.

        Streams that have delivered events share one blocking XREAD on one connection; a stream
        still waiting for its first events (a backlog in the queue makes that most of them),
        submits, cancels and a second reader of a stream take connections of their own, so the
        pool is sized for many concurrent callers (redis-py's default of 100 is easy to
        exceed).
        """
        redis_kwargs.setdefault("max_connections", MAX_CONNECTIONS)
        return cls(async_redis(url, **redis_kwargs), prefix=prefix, queue=queue)

    async def aclose(self) -> None:
        await self._mux.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncHelixClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, prompt: str | Sequence[int] | None = None, *,
                     request_id: str | None = None, queue: str | None = None,
                     **params: Any) -> str:
        """Validate and enqueue a request; returns its id.

        Without ``request_id`` a random id is made and the request enqueued in one round trip.
        With one, submit is idempotent on it: the meta hash is reserved first (HSETNX in a
        script), and a request whose meta already records an entry is not enqueued again (three
        round trips: reserve, XADD, record the entry id).
        """
        body = build_request(prompt, **params)
        queue = queue or self.queue
        if request_id is None:  # a fresh random id: nothing to reserve, one round trip
            rid = uuid.uuid4().hex
            async with self.redis.pipeline(transaction=False) as pipe:
                enqueue_fresh(pipe, rid, body, queue, self.prefix)
                await pipe.execute()
            return rid
        check_request_id(request_id)
        meta = meta_key(request_id, self.prefix)
        if await self._reserve(keys=[meta], args=[QUEUED_TTL_S]):
            return request_id  # already enqueued by an earlier (retried) submit
        fields = encode_request_fields(body, request_id)
        new_entry = await self.redis.xadd(queue_key(queue, self.prefix), fields)  # type: ignore[arg-type]  # redis-py: invariant Dict[FieldT, EncodableT]
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in meta_fields(queue, new_entry):
                pipe.hsetnx(meta, name, value)
            await pipe.execute()
        return request_id

    async def stream(self, request_id: str, from_seq: int = 0, *, block_ms: int = DEFAULT_BLOCK_MS,
                     timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Yield the request's events with ``seq >= from_seq`` once each, up to the terminal one.

        Raises TimeoutError when ``timeout_s`` passes first.
        """
        async for events in self.stream_batches(request_id, from_seq, block_ms=block_ms,
                                                timeout_s=timeout_s):
            for event in events:
                yield event

    async def stream_batches(self, request_id: str, from_seq: int = 0, *,
                             block_ms: int = DEFAULT_BLOCK_MS,
                             timeout_s: float | None = None) -> AsyncGenerator[list[Event], None]:
        """The events of ``stream``, as the lists that arrived together (one read each): a
        reader that writes them on (the gateway) makes one write of a burst, not one a token."""
        key = out_key(request_id, self.prefix)
        reader = StreamReader(request_id, from_seq, block_ms, timeout_s)
        # Up to its first events a stream reads on its own: the shared read would first have to
        # be woken and sent again with the new key, which adds to the time to first token.
        async for events in self._read_alone(key, reader, until_first=True):
            yield events
        if reader.finished:
            return
        if not self._mux.is_following(key):  # the usual case: one shared XREAD for all streams
            async for events in self._mux.follow(key, reader):
                yield events
            return
        async for events in self._read_alone(key, reader):  # a second reader of one stream
            yield events

    async def _read_alone(self, key: str, reader: StreamReader,
                          until_first: bool = False) -> AsyncIterator[list[Event]]:
        """Blocking XREADs of this stream alone, to its end (or its first events)."""
        while not reader.finished:
            try:
                reply = await self.redis.xread({key: reader.last_id}, count=READ_COUNT,
                                               block=reader.block_ms())
            except redis.TimeoutError:
                reply = None  # a socket timeout shorter than the block: same as no news
            events = reader.take(reply)
            if events:
                yield events
                if until_first:
                    return

    async def result(self, request_id: str, timeout_s: float | None = None) -> RequestResult:
        """Wait for the terminal event and return the whole outcome."""
        builder = ResultBuilder(request_id)
        async for event in self.stream(request_id, timeout_s=timeout_s):
            result = builder.add(event)
            if result is not None:
                return result
        raise RuntimeError("stream ended without a terminal event")  # unreachable by protocol

    async def cancel(self, request_id: str) -> bool:
        """Ask for cancellation; True unless the request had already finished."""
        state = text_of(await self._cancel(keys=[meta_key(request_id, self.prefix)],
                                         args=[QUEUED_TTL_S]))
        await self.redis.publish(cancel_channel(self.prefix), request_id)
        return state not in ("done", "error", "cancelled")

    async def meta(self, request_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(meta_key(request_id, self.prefix))
        return {text_of(k) or "": text_of(v) or "" for k, v in raw.items()}

    async def status(self, queue: str | None = None) -> QueueStatus:
        """Queue depth, pending count and the registered daemons with their heartbeats."""
        queue = queue or self.queue
        qkey = queue_key(queue, self.prefix)
        length = await self.redis.xlen(qkey)
        pending, lag = await _group_numbers(self.redis.xinfo_groups(qkey))
        seen = await self.redis.zrange(daemons_key(self.prefix), 0, -1, withscores=True)
        daemons = []
        for daemon_id, score in scored_members(seen):
            beat = parse_heartbeat(await self.redis.get(daemon_key(daemon_id, self.prefix)))
            daemons.append((daemon_id, int(score), beat))
        return QueueStatus(queue, length, pending, lag, daemons)


async def _group_numbers(call: Any) -> tuple[int, int | None]:
    try:
        groups = await call
    except redis.ResponseError:  # no such key yet
        return 0, None
    return pick_group(groups)
