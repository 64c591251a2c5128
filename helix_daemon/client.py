"""Clients of the Helix Redis protocol v1 (see docs/protocol.md): submit, stream, result, cancel.

``AsyncHelixClient`` uses ``redis.asyncio``; ``HelixClient`` is the same logic over the blocking
client. The protocol rules live in I/O-free helpers shared by both: request validation
(``build_request``), the reader's dedupe-by-seq cursor (``SeqCursor``) and result assembly
(``ResultBuilder``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from helix_daemon.protocol import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE,
    GROUP,
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    Heartbeat,
    RequestBody,
    TokenEvent,
    cancel_channel,
    check_request_id,
    daemon_key,
    daemons_key,
    decode_event,
    encode_request_fields,
    is_terminal,
    meta_key,
    out_key,
    queue_key,
    to_request_params,
)
from helix_daemon.redis_conn import async_redis
from helix_daemon.stream_mux import StreamMux
from scheduler.errors import InvalidRequestError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
QUEUED_TTL_S = 86_400  # a meta hash the client creates lives a day unless a daemon takes it over
_READ_COUNT = 512  # events per XREAD: one round trip drains a long burst
_MAX_GAP_REREADS = 3
# Below redis-py's default 5 s socket timeout: a longer XREAD BLOCK would time the socket out.
DEFAULT_BLOCK_MS = 2000
MAX_CONNECTIONS = 1024  # async pool size: one per stream() still waiting for its first events

# Reserve the request id: create meta (state queued, with a TTL so an abandoned id cannot leak)
# unless it exists; return the entry id of an earlier submission ("" when there is none yet).
_RESERVE_LUA = """
local created = redis.call('HSETNX', KEYS[1], 'state', 'queued')
if created == 1 or redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGET', KEYS[1], 'entry_id') or ''
"""

# HSET cancel, keeping (or, for a hash we just created, giving) a TTL so it cannot leak.
# Returns the request's state ("" when it has none yet).
_CANCEL_LUA = """
redis.call('HSET', KEYS[1], 'cancel', '1')
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGET', KEYS[1], 'state') or ''
"""


class StreamGapError(RuntimeError):
    """The out stream skipped a sequence number even after re-reading it (e.g. it was trimmed)."""


# --- I/O-free protocol helpers -----------------------------------------------------------------


def build_request(prompt: str | Sequence[int] | None = None,
                  **params: Any) -> RequestBody:
    """Validate a request client-side exactly as the daemon will; raise InvalidRequestError.

    ``prompt`` may be text or token ids; ``prompt_token_ids=`` may be given as a keyword instead.
    """
    data = dict(params)
    if prompt is not None:
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        if key in data:
            raise InvalidRequestError(f"{key} given twice")
        data[key] = prompt if isinstance(prompt, str) else list(prompt)
    try:
        body = msgspec.convert(data, RequestBody, strict=True)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(str(e)) from e
    to_request_params(body)  # the semantic checks (ranges, prompt XOR ids)
    return body


class SeqCursor:
    """The reader algorithm: deliver each ``seq`` once, in order, from ``from_seq`` on."""

    def __init__(self, from_seq: int = 0) -> None:
        self.next_seq = from_seq
        self.finished = False

    def accept(self, event: Event) -> bool | None:
        """True: deliver it. False: already seen, drop it. None: a gap, re-read from the start."""
        if event.seq < self.next_seq:
            return False
        if event.seq > self.next_seq:
            return None
        self.next_seq += 1
        self.finished = is_terminal(event)
        return True


class StreamReader:
    """One reader of a request's out stream, shared by the async and the sync client: where to
    XREAD from next, which events of a reply to deliver, gaps and the deadline."""

    def __init__(self, request_id: str, from_seq: int, block_ms: int,
                 timeout_s: float | None) -> None:
        self.request_id = request_id
        self.cursor = SeqCursor(from_seq)
        self.last_id: bytes | str = "0"
        self._block_ms = block_ms
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._rereads = 0

    @property
    def finished(self) -> bool:
        return self.cursor.finished

    def seconds_left(self) -> float | None:
        """Time to the deadline (None: no deadline)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def block_ms(self) -> int:
        left = self.seconds_left()
        if left is None:
            return self._block_ms
        # XREAD BLOCK 0 means "forever": never hand it a zero left over from rounding.
        return max(1, min(self._block_ms, int(left * 1000)))

    def take(self, reply: Any) -> list[Event]:
        """The new events of one XREAD reply, in order; raises TimeoutError past the deadline
        and ``StreamGapError`` when a gap persists."""
        entries = reply[0][1] if reply else []
        events: list[Event] = []
        for entry_id, fields in entries:
            event = decode_event(fields)
            verdict = self.cursor.accept(event)
            if verdict is None:  # a gap: read the stream again from its start
                if self._rereads >= _MAX_GAP_REREADS:
                    raise StreamGapError(
                        f"sequence {self.cursor.next_seq} is missing from the out stream")
                self._rereads += 1
                self.last_id = "0"
                break
            self.last_id = entry_id
            if verdict:
                events.append(event)
                if self.cursor.finished:
                    break
        deadline = self._deadline
        if not entries and deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no terminal event for request {self.request_id!r} in time")
        return events


@dataclass
class RequestResult:
    """The outcome of one request, assembled from its events."""

    request_id: str
    state: str  # done | error | cancelled
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length (done); None otherwise
    usage: dict[str, int] | None = None
    timings: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 1  # highest ``att`` seen

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.request_id, "state": self.state, "text": self.text,
                "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "usage": self.usage, "timings": self.timings, "error_code": self.error_code,
                "error_message": self.error_message}


class ResultBuilder:
    """Concatenate token events and record the terminal one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.max_att = 1

    def add(self, event: Event) -> RequestResult | None:
        """Feed one delivered event; returns the result at the terminal event."""
        self.max_att = max(self.max_att, event.att)
        if isinstance(event, TokenEvent):
            if event.off != len(self.ids):
                raise StreamGapError(f"token event at offset {event.off}, expected {len(self.ids)}")
            self.texts.append(event.text)
            self.ids.extend(event.ids)
            return None
        result = RequestResult(self.request_id, "done", "".join(self.texts), self.ids,
                               attempts=self.max_att)
        if isinstance(event, DoneEvent):
            result.finish_reason = event.finish_reason
            result.usage = msgspec.to_builtins(event.usage)
            result.timings = msgspec.to_builtins(event.timings)
        elif isinstance(event, ErrorEvent):
            result.state = "error"
            result.error_code, result.error_message = event.code, event.message
        elif isinstance(event, CancelledEvent):
            result.state, result.error_message = "cancelled", event.reason
        return result


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _parse_heartbeat(raw: bytes | str | None) -> Heartbeat | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=Heartbeat)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class QueueStatus:
    """What ``helix status`` shows: the queue and every daemon that has registered."""

    queue: str
    length: int  # entries in the queue stream (acknowledged entries are deleted)
    pending: int  # delivered to a daemon, not yet acknowledged
    lag: int | None  # entries not yet delivered to any daemon (Redis >= 7)
    daemons: list[tuple[str, int, Heartbeat | None]]  # id, last seen ms, live heartbeat or None


# --- async client -------------------------------------------------------------------------------


class AsyncHelixClient:
    """Asyncio client: ``await submit(...)``, ``async for ev in stream(id)``, ``await result()``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue = queue
        self._cancel = client.register_script(_CANCEL_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._mux = StreamMux(client, _READ_COUNT)

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
                _enqueue_fresh(pipe, rid, body, queue, self.prefix)
                await pipe.execute()
            return rid
        check_request_id(request_id)
        meta = meta_key(request_id, self.prefix)
        if await self._reserve(keys=[meta], args=[QUEUED_TTL_S]):
            return request_id  # already enqueued by an earlier (retried) submit
        fields = encode_request_fields(body, request_id)
        new_entry = await self.redis.xadd(queue_key(queue, self.prefix), fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in _meta_fields(queue, new_entry):
                pipe.hsetnx(meta, name, value)
            await pipe.execute()
        return request_id

    async def stream(self, request_id: str, from_seq: int = 0, *, block_ms: int = DEFAULT_BLOCK_MS,
                     timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Yield the request's events with ``seq >= from_seq`` once each, up to the terminal one.

        Raises TimeoutError when ``timeout_s`` passes first.
        """
        key = out_key(request_id, self.prefix)
        reader = StreamReader(request_id, from_seq, block_ms, timeout_s)
        # Up to its first events a stream reads on its own: the shared read would first have to
        # be woken and sent again with the new key, which adds to the time to first token.
        async for event in self._read_alone(key, reader, until_first=True):
            yield event
        if reader.finished:
            return
        if not self._mux.is_following(key):  # the usual case: one shared XREAD for all streams
            async for event in self._mux.follow(key, reader):
                yield event
            return
        async for event in self._read_alone(key, reader):  # a second reader of one stream
            yield event

    async def _read_alone(self, key: str, reader: StreamReader,
                          until_first: bool = False) -> AsyncIterator[Event]:
        """Blocking XREADs of this stream alone, to its end (or its first events)."""
        while not reader.finished:
            try:
                reply = await self.redis.xread({key: reader.last_id}, count=_READ_COUNT,
                                               block=reader.block_ms())
            except redis.TimeoutError:
                reply = None  # a socket timeout shorter than the block: same as no news
            events = reader.take(reply)
            for event in events:
                yield event
            if until_first and events:
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
        state = _text(await self._cancel(keys=[meta_key(request_id, self.prefix)],
                                         args=[QUEUED_TTL_S]))
        await self.redis.publish(cancel_channel(self.prefix), request_id)
        return state not in ("done", "error", "cancelled")

    async def meta(self, request_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(meta_key(request_id, self.prefix))
        return {_text(k) or "": _text(v) or "" for k, v in raw.items()}

    async def status(self, queue: str | None = None) -> QueueStatus:
        """Queue depth, pending count and the registered daemons with their heartbeats."""
        queue = queue or self.queue
        qkey = queue_key(queue, self.prefix)
        length = await self.redis.xlen(qkey)
        pending, lag = await _group_numbers(self.redis.xinfo_groups(qkey))
        seen = await self.redis.zrange(daemons_key(self.prefix), 0, -1, withscores=True)
        daemons = []
        for member, score in seen:
            daemon_id = _text(member) or ""
            beat = _parse_heartbeat(await self.redis.get(daemon_key(daemon_id, self.prefix)))
            daemons.append((daemon_id, int(score), beat))
        return QueueStatus(queue, length, pending, lag, daemons)


async def _group_numbers(call: Any) -> tuple[int, int | None]:
    try:
        groups = await call
    except redis.ResponseError:  # no such key yet
        return 0, None
    return _pick_group(groups)


# --- sync client ----------------------------------------------------------------------------------


class HelixClient:
    """Blocking client with the same methods as ``AsyncHelixClient``."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue = queue
        self._cancel = client.register_script(_CANCEL_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE, **redis_kwargs: Any) -> HelixClient:
        """Connect to ``url``; ``redis_kwargs`` go to ``redis.Redis.from_url``."""
        return cls(redis.Redis.from_url(url, **redis_kwargs), prefix=prefix, queue=queue)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> HelixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, prompt: str | Sequence[int] | None = None, *,
               request_id: str | None = None, queue: str | None = None, **params: Any) -> str:
        """See ``AsyncHelixClient.submit``."""
        body = build_request(prompt, **params)
        queue = queue or self.queue
        if request_id is None:
            rid = uuid.uuid4().hex
            pipe = self.redis.pipeline(transaction=False)
            _enqueue_fresh(pipe, rid, body, queue, self.prefix)
            pipe.execute()
            return rid
        check_request_id(request_id)
        meta = meta_key(request_id, self.prefix)
        if self._reserve(keys=[meta], args=[QUEUED_TTL_S]):
            return request_id
        new_entry = self.redis.xadd(queue_key(queue, self.prefix),
                                    encode_request_fields(body, request_id))
        pipe = self.redis.pipeline(transaction=True)
        for name, value in _meta_fields(queue, new_entry):
            pipe.hsetnx(meta, name, value)
        pipe.execute()
        return request_id

    def stream(self, request_id: str, from_seq: int = 0, *, block_ms: int = DEFAULT_BLOCK_MS,
               timeout_s: float | None = None) -> Iterator[Event]:
        """See ``AsyncHelixClient.stream``."""
        key = out_key(request_id, self.prefix)
        reader = StreamReader(request_id, from_seq, block_ms, timeout_s)
        while not reader.finished:
            try:
                reply = self.redis.xread({key: reader.last_id}, count=_READ_COUNT,
                                         block=reader.block_ms())
            except redis.TimeoutError:
                reply = None
            yield from reader.take(reply)

    def result(self, request_id: str, timeout_s: float | None = None) -> RequestResult:
        """See ``AsyncHelixClient.result``."""
        builder = ResultBuilder(request_id)
        for event in self.stream(request_id, timeout_s=timeout_s):
            result = builder.add(event)
            if result is not None:
                return result
        raise RuntimeError("stream ended without a terminal event")

    def cancel(self, request_id: str) -> bool:
        """See ``AsyncHelixClient.cancel``."""
        state = _text(self._cancel(keys=[meta_key(request_id, self.prefix)],
                                   args=[QUEUED_TTL_S]))
        self.redis.publish(cancel_channel(self.prefix), request_id)
        return state not in ("done", "error", "cancelled")

    def meta(self, request_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(meta_key(request_id, self.prefix))
        return {_text(k) or "": _text(v) or "" for k, v in raw.items()}

    def status(self, queue: str | None = None) -> QueueStatus:
        """See ``AsyncHelixClient.status``."""
        queue = queue or self.queue
        qkey = queue_key(queue, self.prefix)
        try:
            pending, lag = _pick_group(self.redis.xinfo_groups(qkey))
        except redis.ResponseError:
            pending, lag = 0, None
        daemons = []
        for member, score in self.redis.zrange(daemons_key(self.prefix), 0, -1, withscores=True):
            daemon_id = _text(member) or ""
            beat = _parse_heartbeat(self.redis.get(daemon_key(daemon_id, self.prefix)))
            daemons.append((daemon_id, int(score), beat))
        return QueueStatus(queue, self.redis.xlen(qkey), pending, lag, daemons)


# --- shared small pieces ------------------------------------------------------------------------


def _enqueue_fresh(pipe: Any, request_id: str, body: RequestBody, queue: str,
                   prefix: str) -> None:
    """Queue the commands that enqueue a request under a new random id (one round trip).

    Nobody else can hold a fresh uuid4, so the reservation of a client-chosen id is not needed.
    The meta hash is written before the entry (one connection keeps the order), so no daemon
    can claim the entry before it exists; the claim script records the entry id itself.
    """
    meta = meta_key(request_id, prefix)
    for name, value in (("state", "queued"), ("queue", queue), ("created_ms", str(_now_ms()))):
        pipe.hsetnx(meta, name, value)
    pipe.expire(meta, QUEUED_TTL_S)
    pipe.xadd(queue_key(queue, prefix), encode_request_fields(body, request_id))


def _meta_fields(queue: str, entry_id: bytes | str) -> list[tuple[str, str]]:
    # HSETNX each: a daemon that already claimed the entry may have written these itself.
    return [("queue", queue), ("entry_id", _text(entry_id) or ""),
            ("created_ms", str(_now_ms()))]


def _pick_group(groups: list[Mapping[Any, Any]]) -> tuple[int, int | None]:
    for group in groups:
        named = {_text(k): v for k, v in group.items()}
        if _text(named.get("name")) == GROUP:
            lag = named.get("lag")
            return int(named.get("pending") or 0), None if lag is None else int(lag)
    return 0, None


def result_json(result: RequestResult) -> str:
    """One JSONL line for ``helix batch`` output."""
    return json.dumps(result.to_dict(), ensure_ascii=False)
