"""The I/O-free core of the Helix clients (protocol v1, docs/protocol.md), shared by the async
and the sync client: request validation (``build_request``), the reader's dedupe-by-seq cursor
(``SeqCursor``, ``StreamReader``), result assembly (``ResultBuilder``) and the commands of a submit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from helix_daemon.wire.protocol import (
    GROUP,
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    Heartbeat,
    RequestBody,
    TokenEvent,
    decode_event,
    encode_request_fields,
    is_terminal,
    meta_key,
    queue_key,
    to_request_params,
)
from scheduler.errors import InvalidRequestError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
QUEUED_TTL_S = 86_400  # a meta hash the client creates lives a day unless a daemon takes it over
READ_COUNT = 512  # events per XREAD: one round trip drains a long burst
_MAX_GAP_REREADS = 3
# Below redis-py's default 5 s socket timeout: a longer XREAD BLOCK would time the socket out.
DEFAULT_BLOCK_MS = 2000
MAX_CONNECTIONS = 1024  # async pool size: one per stream() still waiting for its first events

# Reserve the request id: create meta (state queued, with a TTL so an abandoned id cannot leak)
# unless it exists; return the entry id of an earlier submission ("" when there is none yet).
RESERVE_LUA = """
local created = redis.call('HSETNX', KEYS[1], 'state', 'queued')
if created == 1 or redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGET', KEYS[1], 'entry_id') or ''
"""

# HSET cancel, keeping (or, for a hash we just created, giving) a TTL so it cannot leak.
# Returns the request's state ("" when it has none yet).
CANCEL_LUA = """
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


def text_of(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def parse_heartbeat(raw: bytes | str | None) -> Heartbeat | None:
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


def enqueue_fresh(pipe: Any, request_id: str, body: RequestBody, queue: str,
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


def meta_fields(queue: str, entry_id: bytes | str) -> list[tuple[str, str]]:
    # HSETNX each: a daemon that already claimed the entry may have written these itself.
    return [("queue", queue), ("entry_id", text_of(entry_id) or ""),
            ("created_ms", str(_now_ms()))]


def pick_group(groups: Sequence[Mapping[str, Any]]) -> tuple[int, int | None]:
    for group in groups:
        named = {text_of(k): v for k, v in group.items()}
        if text_of(named.get("name")) == GROUP:
            lag = named.get("lag")
            return int(named.get("pending") or 0), None if lag is None else int(lag)
    return 0, None


def scored_members(reply: Sequence[object]) -> list[tuple[str, float]]:
    """A ``ZRANGE ... WITHSCORES`` reply as (member, score) pairs."""
    pairs = []
    for item in reply:
        if not isinstance(item, (tuple, list)):
            raise TypeError(f"ZRANGE reply without scores: {item!r}")
        member, score = item
        pairs.append((text_of(member) or "", float(score)))
    return pairs


def result_json(result: RequestResult) -> str:
    """One JSONL line for ``helix batch`` output."""
    return json.dumps(result.to_dict(), ensure_ascii=False)
