"""``BatchStore``: batch objects in Redis, the lease that says which replica works on a batch,
and status changes that only happen from an expected status (a Lua compare-and-set).

Keys (``{...}`` is a hash tag): ``<prefix>:b:{<batch_id>}`` (HASH: ``status``, ``object`` JSON,
``t:<status>_at`` times), ``<prefix>:b:{<batch_id>}:lease`` (STRING: the working replica, PX),
``<prefix>:b:{<batch_id>}:errors`` (HASH: custom_id -> JSON error of a line that never reached
the queue), ``<prefix>:batches`` (ZSET: batch id -> creation ms, for listing) and
``<prefix>:batches:active`` (SET: batches not yet in a final status).

A batch still running at ``expires_at`` (creation + its ``completion_window``) goes to
``expiring`` (kept in Redis, so that whichever replica holds the lease next finishes it; the API
shows it as ``in_progress``, OpenAI's statuses have no ``expiring``) and then ``expired``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
BATCH_TTL_S = 30 * 86_400  # a batch object outlives its files (a week) for the record
# OpenAI accepts only "24h"; shorter windows ("1h", "90m", "30s") are Helix's own. Longer ones
# would outlive the 7-day input file and the 2-day line results that are sized for 24 h.
MAX_WINDOW_S = 86_400
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
          "cancelled_at", "expired_at")

# KEYS[1] batch hash; ARGV: new status, now (s), then the statuses it may change from.
_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'status')
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 't:' .. ARGV[1] .. '_at', ARGV[2])
    return 1
  end
end
return 0
"""

# KEYS[1] lease; ARGV: replica id, ttl ms. Take a free lease or renew our own.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def parse_window(text: str) -> int:
    """The seconds of a ``completion_window`` such as ``"24h"``, ``"90m"`` or ``"30s"``; raise
    ValueError for anything else, or for a window of 0 or over 24 h."""
    match = re.fullmatch(r"([0-9]+)([smh])", text)
    seconds = int(match[1]) * _WINDOW_UNITS[match[2]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ValueError(f"completion_window must be a duration up to 24h such as '24h', '90m' "
                         f"or '30s', got {text!r}")
    return seconds


class BatchStore:
    """The batch objects of one prefix."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._transition = client.register_script(_TRANSITION_LUA)
        self._lease = client.register_script(_LEASE_LUA)

    def key(self, batch_id: str) -> str:
        return f"{self._prefix}:b:{{{batch_id}}}"

    def errors_key(self, batch_id: str) -> str:
        return f"{self._prefix}:b:{{{batch_id}}}:errors"

    async def create(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        """A new batch in ``validating``; ``completion_window`` must have passed
        ``parse_window``."""
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex}"
        obj = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
               "input_file_id": input_file_id, "completion_window": completion_window,
               "output_file_id": None, "error_file_id": None, "created_at": now,
               "expires_at": now + parse_window(completion_window), "metadata": metadata,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(batch_id), mapping={"status": "validating",
                                                   "object": json.dumps(obj)})
            pipe.expire(self.key(batch_id), BATCH_TTL_S)
            pipe.zadd(f"{self._prefix}:batches", {batch_id: now * 1000})
            pipe.sadd(f"{self._prefix}:batches:active", batch_id)
            await pipe.execute()
        return await self.get(batch_id) or obj

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        raw = await self._client.hgetall(self.key(batch_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        obj: dict[str, Any] = json.loads(fields["object"])
        obj["status"] = fields["status"]
        for name in _TIMES:
            value = fields.get(f"t:{name}")
            obj[name] = None if value is None else int(value)
        return obj

    async def recent(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, starting below ``after``."""
        index = f"{self._prefix}:batches"
        start = 0
        if after is not None:
            rank: Any = await self._client.zrevrank(index, after)  # an int, or None
            start = 0 if rank is None else int(rank) + 1
        ids = await self._client.zrevrange(index, start, start + limit - 1)
        found = [await self.get(_text(i)) for i in ids]
        return [b for b in found if b is not None]

    async def update(self, batch_id: str, **changes: Any) -> None:
        """Change fields of the object (only the replica holding the lease calls this)."""
        raw = await self._client.hget(self.key(batch_id), "object")
        if raw is None:
            return
        obj = json.loads(raw) | changes
        await self._client.hset(self.key(batch_id), "object", json.dumps(obj))

    async def transition(self, batch_id: str, to: str, *from_: str) -> bool:
        """Set the status to ``to`` if it is one of ``from_``; True if it changed."""
        changed = bool(await self._transition(keys=[self.key(batch_id)],
                                              args=[to, int(time.time()), *from_]))
        if changed and to in FINAL:
            await self._client.srem(f"{self._prefix}:batches:active", batch_id)
        return changed

    async def active(self) -> list[str]:
        return sorted(_text(m) for m in
                      await self._client.smembers(f"{self._prefix}:batches:active"))

    async def take_lease(self, batch_id: str, replica_id: str, ttl_ms: int) -> bool:
        return bool(await self._lease(keys=[f"{self.key(batch_id)}:lease"],
                                      args=[replica_id, ttl_ms]))

    async def line_errors(self, batch_id: str) -> dict[str, dict[str, Any]]:
        """custom_id -> {status_code, body} of the lines that never reached the queue."""
        raw = await self._client.hgetall(self.errors_key(batch_id))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    async def add_line_errors(self, batch_id: str, errors: dict[str, dict[str, Any]]) -> None:
        if errors:
            key = self.errors_key(batch_id)
            await self._client.hset(key, mapping={k: json.dumps(v) for k, v in errors.items()})
            await self._client.expire(key, BATCH_TTL_S)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
