"""Redis side of the daemon: the queue's consumer group and fenced writes to request streams.

Every write to a request's keys goes through one of two Lua scripts so that it is checked and
applied atomically:

* ``claim`` takes ownership of a request for one attempt: it bumps ``epoch`` (fencing every older
  attempt), counts the attempt, and settles requests that must not run (already terminal, a
  duplicate submission of the same id, cancelled while queued, poison).
* ``append`` writes events, each checked on its own. It refuses a write when the caller's
  epoch/owner is stale (``fenced``) or the request expired (``gone``); it keeps ``seq`` gap-free
  (a retried write that already landed answers ``dup``) and turns a token write into
  ``cancelled`` once asked to. One call carries a whole flush round, many requests' events.

A claim touches only the two ``{id}``-tagged keys of one request. An append call touches those of
every request in its round, which a standalone Redis (or one primary) serves; under Redis Cluster
the round would have to be split by hash slot. Acks and dead letters are separate commands issued
after the terminal event is durable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT, FieldT, StreamIdT

from helix_daemon.wire import protocol as p

RUNNING_TTL_MS = 86_400_000  # keys of a live request: a day, refreshed by every write

Entry = tuple[str, dict[bytes, bytes]]

_CLAIM_LUA = """
local meta, out = KEYS[1], KEYS[2]
local daemon, entry, queue = ARGV[1], ARGV[2], ARGV[3]
local now, run_ttl, max_att = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local res_ttl, created = tonumber(ARGV[7]), ARGV[8]
local m = redis.call('HMGET', meta, 'state', 'epoch', 'entry_id', 'cancel', 'next_seq',
                     'next_off', 'attempts')
local seq, off = tonumber(m[5] or '0'), tonumber(m[6] or '0')
local attempts = tonumber(m[7] or '0')
if m[1] == 'done' or m[1] == 'error' or m[1] == 'cancelled' then
  return {'final', tonumber(m[2] or '0'), seq, off, attempts}
end
if m[2] and m[3] and m[3] ~= entry then
  return {'duplicate', tonumber(m[2]), seq, off, attempts}
end
local epoch = tonumber(m[2] or '0') + 1
attempts = attempts + 1
redis.call('HSET', meta, 'epoch', epoch, 'owner', daemon, 'attempts', attempts, 'queue', queue,
           'entry_id', entry, 'next_seq', seq, 'next_off', off)
redis.call('HSETNX', meta, 'created_ms', created)
local function settle(state, ...)
  redis.call('XADD', out, '*', 'type', state, 'seq', seq, 'att', epoch, ...)
  redis.call('HSET', meta, 'state', state, 'next_seq', seq + 1, 'finished_ms', now)
  redis.call('PEXPIRE', meta, res_ttl)
  redis.call('PEXPIRE', out, res_ttl)
end
if m[4] == '1' then
  settle('cancelled', 'reason', 'cancelled before it started')
  return {'cancelled', epoch, seq + 1, off, attempts}
end
if attempts > max_att then
  redis.call('HSET', meta, 'error_code', 'poison')
  settle('error', 'code', 'poison', 'message',
         'gave up after ' .. (attempts - 1) .. ' attempts')
  return {'poison', epoch, seq + 1, off, attempts}
end
redis.call('HSET', meta, 'state', 'running')
redis.call('PEXPIRE', meta, run_ttl)
redis.call('PEXPIRE', out, run_ttl)
return {'ok', epoch, seq, off, attempts}
"""

# One call writes the events of many requests (a flush round): one script call per round instead
# of one per request saves a command's parsing and dispatch per token event on both ends. Each
# event is checked and written on its own, and an error in one (pcall) does not stop the others.
_APPEND_LUA = """
local function append(meta, out, A)
  local epoch, owner, seq, off = A[1], A[2], tonumber(A[3]), tonumber(A[4])
  local off_after, final_state = tonumber(A[5]), A[6]
  local cap, ttl, now = A[7], tonumber(A[8]), A[9]
  if redis.call('EXISTS', meta) == 0 then return 'gone' end
  local m = redis.call('HMGET', meta, 'state', 'epoch', 'owner', 'next_seq', 'next_off', 'cancel')
  if m[2] ~= epoch or m[3] ~= owner then return 'fenced' end
  local next_seq = tonumber(m[4] or '0')
  if seq < next_seq then return 'dup' end
  if m[1] ~= 'running' then return 'fenced' end
  if seq > next_seq or off ~= tonumber(m[5] or '0') then return 'gap' end
  if final_state == '' and m[6] == '1' then
    redis.call('XADD', out, 'MAXLEN', '~', cap, '*', 'type', 'cancelled', 'seq', seq,
               'att', epoch, 'reason', 'cancelled by client')
    final_state, off_after = 'cancelled', off
    redis.call('HSET', meta, 'finish_reason', 'cancelled')
  else
    redis.call('XADD', out, 'MAXLEN', '~', cap, '*', unpack(A, 12))
  end
  redis.call('HSET', meta, 'next_seq', seq + 1, 'next_off', off_after)
  if final_state ~= '' then
    redis.call('HSET', meta, 'state', final_state, 'finished_ms', now)
    if A[10] ~= '' then redis.call('HSET', meta, 'finish_reason', A[10]) end
    if A[11] ~= '' then redis.call('HSET', meta, 'error_code', A[11]) end
  end
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', out, ttl)
  if final_state == 'cancelled' and A[6] == '' then return 'cancelled' end
  return 'ok'
end
-- KEYS: meta, out of each event in turn; ARGV: each event's argument count, then its arguments
local replies, at = {}, 1
for i = 1, #KEYS, 2 do
  local n = tonumber(ARGV[at])
  local ok, reply = pcall(append, KEYS[i], KEYS[i + 1], {unpack(ARGV, at + 1, at + n)})
  if not ok then
    reply = 'error: ' .. (type(reply) == 'table' and tostring(reply.err) or tostring(reply))
  end
  replies[#replies + 1] = reply
  at = at + n + 1
end
return replies
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` decided. Only ``status == "ok"`` means: run it, as attempt ``epoch``."""

    status: str  # ok | final | duplicate | cancelled | poison
    epoch: int
    next_seq: int
    next_off: int
    attempts: int


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One entry to claim: its request, entry id and enqueue time, and the result TTL."""

    request_id: str
    entry_id: str
    created_ms: int
    result_ttl_ms: int


_Call = tuple[list[str], list[Any]]  # the keys and args of one script call


@dataclass(slots=True)
class Append:
    """One fenced event write. ``off``/``off_after``: output offset before and after it."""

    request_id: str
    owner: str
    event: p.Event
    off: int
    off_after: int
    ttl_ms: int
    terminal_state: str = ""  # "" for a token event, else the meta state it leaves
    finish_reason: str = ""
    error_code: str = ""
    attempted: bool = field(default=False)  # sent at least once: its seq is frozen

    @property
    def seq(self) -> int:
        return self.event.seq


def _s(value: bytes | str | int) -> str:
    """An id or name from a reply (redis-py types some reply fields as possibly int)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    """Async wrappers for one daemon on one queue. Methods raise redis errors to the caller."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, queue: str, daemon_id: str,
                 lease_ms: int) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue = queue
        self.daemon_id = daemon_id
        self.lease_ms = lease_ms
        self.queue_key = p.queue_key(queue, prefix)
        self.dlq_key = p.dlq_key(queue, prefix)
        self._claim = client.register_script(_CLAIM_LUA)
        self._append = client.register_script(_APPEND_LUA)

    # --- the queue ----------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group (from the start of the stream) unless it exists."""
        try:
            await self.redis.xgroup_create(self.queue_key, p.GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` never-delivered entries, waiting at most ``block_ms``."""
        reply = await self.redis.xreadgroup(p.GROUP, self.daemon_id, {self.queue_key: ">"},
                                            count=count, block=block_ms)
        return _entries(reply)

    async def read_own_pending(self, count: int = 1000) -> list[Entry]:
        """Entries delivered to this consumer name and never acked (a restart gets them back)."""
        reply = await self.redis.xreadgroup(p.GROUP, self.daemon_id, {self.queue_key: "0"},
                                            count=count)
        return [(i, f) for i, f in _entries(reply) if f]

    async def autoclaim(self, count: int) -> tuple[list[Entry], list[str]]:
        """Take over entries idle for a lease; returns (claimed, ids deleted from the stream)."""
        reply = await self.redis.xautoclaim(self.queue_key, p.GROUP, self.daemon_id,
                                            min_idle_time=self.lease_ms, start_id="0-0",
                                            count=count)
        claimed = [(_s(i), f) for i, f in reply[1] if f is not None]
        deleted = [_s(i) for i, f in reply[1] if f is None]
        if len(reply) > 2:  # Redis >= 7 lists entries trimmed away while pending
            deleted += [_s(i) for i in reply[2]]
        return claimed, deleted

    async def own_pending_ids(self, count: int = 10_000) -> set[str]:
        """Entry ids the group still lists under this daemon's name."""
        rows = await self.redis.xpending_range(self.queue_key, p.GROUP, min="-", max="+",
                                               count=count, consumername=self.daemon_id)
        return {_s(row["message_id"]) for row in rows}

    async def renew(self, entry_ids: Iterable[str]) -> int:
        """Reset the idle time of entries we still own, without counting a delivery.

        Only ids XPENDING still lists under our name are touched: a resumed zombie must not pull
        an entry back from the daemon that took it over.
        """
        ours = await self.own_pending_ids()
        ids: list[StreamIdT] = [i for i in entry_ids if i in ours]
        if ids:
            await self.redis.xclaim(self.queue_key, p.GROUP, self.daemon_id, 0, ids, justid=True)
        return len(ids)

    async def release(self, entry_ids: Sequence[str]) -> None:
        """Hand entries back at once: mark them idle for ten leases so any daemon takes them."""
        ours = await self.own_pending_ids()
        ids: list[StreamIdT] = [i for i in entry_ids if i in ours]
        if ids:
            await self.redis.xclaim(self.queue_key, p.GROUP, self.daemon_id, 0, ids,
                                    idle=self.lease_ms * 10, justid=True)

    async def ack(self, entry_ids: Sequence[str]) -> None:
        """Forget finished entries: ack (leave the pending list) and delete them from the queue."""
        if not entry_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.queue_key, p.GROUP, *entry_ids)
            pipe.xdel(self.queue_key, *entry_ids)
            await pipe.execute()

    async def dead_letter(self, entry_id: str, request_id: str | None, reason: str,
                          fields: dict[bytes, bytes] | None) -> None:
        record: dict[FieldT, EncodableT] = {
            "entry_id": entry_id, "reason": reason, "fields": p.lossy_fields_json(fields or {}),
            "daemon": self.daemon_id}
        if request_id is not None:
            record["id"] = request_id
        await self.redis.xadd(self.dlq_key, record, maxlen=p.DLQ_MAXLEN, approximate=True)

    # --- request keys ---------------------------------------------------------------------

    def _keys(self, request_id: str) -> list[str]:
        return [p.meta_key(request_id, self.prefix), p.out_key(request_id, self.prefix)]

    async def claim(self, request_id: str, entry_id: str, *, now_ms: int, created_ms: int,
                    max_attempts: int, result_ttl_ms: int) -> Claim:
        """Own ``request_id`` for a new attempt (see the module docstring)."""
        [claim] = await self.claim_many([ClaimRequest(request_id, entry_id, created_ms,
                                                      result_ttl_ms)], now_ms=now_ms,
                                        max_attempts=max_attempts)
        return claim

    async def claim_many(self, requests: Sequence[ClaimRequest], *, now_ms: int,
                         max_attempts: int) -> list[Claim]:
        """``claim`` for a batch of entries in one round trip, in order."""
        calls = [(self._keys(r.request_id),
                  [self.daemon_id, r.entry_id, self.queue, now_ms, RUNNING_TTL_MS, max_attempts,
                   r.result_ttl_ms, r.created_ms]) for r in requests]
        claims = []
        for reply in await self._evalsha_many(self._claim, calls):
            if isinstance(reply, Exception):
                raise reply
            status, epoch, seq, off, attempts = reply
            claims.append(Claim(_s(status), int(epoch), int(seq), int(off), int(attempts)))
        return claims

    async def append_many(self, ops: Sequence[Append], now_ms: int) -> list[str]:
        """Send every write in one script call, in order; one status per op."""
        if not ops:
            return []
        keys: list[str] = []
        args: list[Any] = []
        for op in ops:
            op.attempted = True
            keys += self._keys(op.request_id)
            op_args = _append_args(op, now_ms)
            args += [len(op_args), *op_args]
        [reply] = await self._evalsha_many(self._append, [(keys, args)])
        if isinstance(reply, Exception):
            return [_reply(reply)] * len(ops)
        return [_s(r) for r in reply]

    async def _evalsha_many(self, script: Any, calls: Sequence[_Call]) -> list[Any]:
        """Run ``script`` once per (keys, args) in one pipeline; one reply or error each."""
        replies = await self._send_evalsha(script.sha, calls)
        if replies and isinstance(replies[-1], NoScriptError):
            # Redis lost its scripts (a restart or SCRIPT FLUSH): nothing from the first
            # NOSCRIPT on ran, so load the script and send those calls again, in order.
            first = next(i for i, r in enumerate(replies) if isinstance(r, NoScriptError))
            await self.redis.script_load(script.script)
            replies[first:] = await self._send_evalsha(script.sha, calls[first:])
        return replies

    async def _send_evalsha(self, sha: str, calls: Sequence[_Call]) -> list[Any]:
        # Plain EVALSHA: a pipeline of registered Script objects would first send SCRIPT EXISTS,
        # a whole extra round trip every time.
        if not calls:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            # One bad call must not block the others: script errors come back per call.
            return list(await pipe.execute(raise_on_error=False))

    async def committed_token_ids(self, request_id: str) -> list[int]:
        """Token ids already streamed for a request, in order (what a takeover must keep)."""
        ids: list[int] = []
        for _, fields in await self.redis.xrange(p.out_key(request_id, self.prefix)) or []:
            if fields and fields.get(b"type") == b"token":
                ids.extend(json.loads(fields[b"ids"]))
        return ids

    async def cancel_requested(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these requests have ``meta.cancel == 1`` (the durable cancel signal)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in request_ids:
                pipe.hget(p.meta_key(rid, self.prefix), "cancel")
            flags = await pipe.execute()
        return {rid for rid, flag in zip(request_ids, flags) if flag == b"1"}

    # --- liveness -------------------------------------------------------------------------

    async def heartbeat(self, beat: p.Heartbeat, ttl_ms: int, now_ms: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(p.daemon_key(self.daemon_id, self.prefix), _json(beat), px=ttl_ms)
            pipe.zadd(p.daemons_key(self.prefix), {self.daemon_id: now_ms})
            await pipe.execute()

    async def unregister(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(p.daemon_key(self.daemon_id, self.prefix))
            pipe.zrem(p.daemons_key(self.prefix), self.daemon_id)
            await pipe.execute()


def _reply(reply: object) -> str:
    if isinstance(reply, ConnectionError | TimeoutError | RedisConnectionError):
        raise reply  # the link broke mid-pipeline: the caller retries the whole batch
    if isinstance(reply, Exception):
        return f"error: {reply}"
    return _s(reply)  # type: ignore[arg-type]


def _append_args(op: Append, now_ms: int) -> list[str | int]:
    args: list[str | int] = [op.event.att, op.owner, op.seq, op.off, op.off_after,
                             op.terminal_state, p.OUT_MAXLEN, op.ttl_ms, now_ms,
                             op.finish_reason, op.error_code]
    for name, value in p.encode_event(op.event).items():
        args += [name, value]
    return args


def _entries(reply: Iterable[Any] | None) -> list[Entry]:
    """Flatten an XREADGROUP reply (RESP2: ``[[key, [(id, fields), ...]]]``) of one stream."""
    if not reply:
        return []
    return [(_s(entry_id), fields or {}) for _key, messages in reply
            for entry_id, fields in messages]


def _json(beat: p.Heartbeat) -> str:
    return msgspec.json.encode(beat).decode()


def entry_ms(entry_id: str) -> int:
    """Milliseconds part of a stream entry id (the enqueue time)."""
    return int(entry_id.split("-", 1)[0])
