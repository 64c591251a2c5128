"""``FileStore``: uploaded and generated files in Redis, one hash per file (``meta`` JSON and
``data`` bytes) that expires ``ttl_s`` after it was written."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

FILE_TTL_S = 7 * 86_400  # long enough for a 24 h batch and a week to fetch its results
MAX_FILE_BYTES = 100 << 20  # OpenAI allows 200 MB; Redis holds whole values in memory


def file_key(file_id: str, prefix: str) -> str:
    return f"{prefix}:f:{{{file_id}}}"


class FileStore:
    """Create, describe and read files; ids are ``file-<hex>`` unless the caller names one."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int = FILE_TTL_S) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s

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
            await pipe.execute()
        return meta

    async def get(self, file_id: str) -> dict[str, Any] | None:
        raw = await self._client.hget(file_key(file_id, self._prefix), "meta")
        return None if raw is None else dict(json.loads(raw))

    async def content(self, file_id: str) -> bytes | None:
        data = await self._client.hget(file_key(file_id, self._prefix), "data")
        return data if isinstance(data, bytes | None) else str(data).encode()
