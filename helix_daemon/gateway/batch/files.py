"""``FileStore``: uploaded and generated files in Redis, one hash per file (``meta`` JSON and
``data`` bytes) that expires ``ttl_s`` after it was written, and a ZSET of the file ids by
creation time for listing (entries of expired files are dropped when the list is read)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

FILE_TTL_S = 7 * 86_400  # long enough for a 24 h batch and a week to fetch its results
MAX_FILE_BYTES = 100 << 20  # OpenAI allows 200 MB; Redis holds whole values in memory
_METAS_AT_ONCE = 1000  # file descriptions read in one pipeline while listing


def file_key(file_id: str, prefix: str) -> str:
    return f"{prefix}:f:{{{file_id}}}"


class FileStore:
    """Create, describe and read files; ids are ``file-<hex>`` unless the caller names one."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int = FILE_TTL_S) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._index = f"{prefix}:files"

    async def create(self, data: bytes, filename: str, purpose: str,
                     file_id: str | None = None) -> dict[str, Any]:
        """Store ``data``; the same ``file_id`` again replaces it (a retried finalization)."""
        now = int(time.time())
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        meta = {"id": file_id, "object": "file",
                "bytes": len(data), "created_at": now, "expires_at": now + self._ttl_s,
                "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None}
        key = file_key(file_id, self._prefix)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"meta": json.dumps(meta), "data": data})
            pipe.expire(key, self._ttl_s)
            pipe.zadd(self._index, {file_id: int(time.time() * 1000)})
            await pipe.execute()
        return meta

    async def get(self, file_id: str) -> dict[str, Any] | None:
        raw = await self._client.hget(file_key(file_id, self._prefix), "meta")
        return None if raw is None else dict(json.loads(raw))

    async def list(self, purpose: str | None, limit: int, order: str,
                   after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` descriptions, newest first (``order="desc"``) or oldest first, of the
        files with ``purpose`` (any when None) that come after the file ``after``, and whether
        more follow. An ``after`` that is gone (deleted, expired) ends the listing: its place
        is unknown, and starting over would send a paging client round in circles."""
        client = self._client
        await client.zremrangebyscore(self._index, "-inf", (time.time() - self._ttl_s) * 1000)
        desc = order == "desc"
        start = 0
        if after is not None:
            rank: Any = await (client.zrevrank if desc else client.zrank)(self._index, after)
            if rank is None:
                return [], False
            start = int(rank) + 1
        ids = await (client.zrevrange if desc else client.zrange)(self._index, start, -1)
        found: list[dict[str, Any]] = []
        size = min(limit + 1, _METAS_AT_ONCE)  # one more than the page says whether more follow
        for at in range(0, len(ids), size):
            async with client.pipeline(transaction=False) as pipe:
                for file_id in ids[at:at + size]:
                    pipe.hget(file_key(_text(file_id), self._prefix), "meta")
                metas = [json.loads(raw) for raw in await pipe.execute() if raw is not None]
            found += [m for m in metas if purpose is None or m["purpose"] == purpose]
            if len(found) > limit:
                break
        return found[:limit], len(found) > limit

    async def delete(self, file_id: str) -> bool:
        """Remove the file; False if there was none."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.delete(file_key(file_id, self._prefix))
            pipe.zrem(self._index, file_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def content(self, file_id: str) -> bytes | None:
        data = await self._client.hget(file_key(file_id, self._prefix), "data")
        return data if isinstance(data, bytes | None) else str(data).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
