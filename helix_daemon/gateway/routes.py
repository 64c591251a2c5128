"""Which queue serves a model: read from the live daemons' heartbeats, reused for a short while.

A daemon's heartbeat (``helix:d:<id>``, docs/protocol.md) names its ``model`` and its ``queue``;
both are accepted as the OpenAI ``model`` of a request, as are the configured extra routes.
A name nobody serves is a 404; a name that is known (a configured route, or a queue) but has no
live daemon is a 503, and so is any name while no daemon at all is alive (the gateway cannot
tell then whether the name would be served).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from helix_daemon.client.core import parse_heartbeat
from helix_daemon.gateway.errors import APIError
from helix_daemon.wire.protocol import Heartbeat, daemon_key, daemons_key


@dataclass
class LiveModels:
    """One reading of the heartbeats."""

    queues: dict[str, str] = field(default_factory=dict)  # model name or queue -> queue
    beats: list[Heartbeat] = field(default_factory=list)
    read_at: float = 0.0  # time.monotonic() of the reading

    def served(self, queue: str) -> bool:
        return any(beat.queue == queue for beat in self.beats)


class ModelRoutes:
    """Model name -> queue, from heartbeats (refreshed every ``ttl_s``) and static routes."""

    def __init__(self, client: aioredis.Redis, prefix: str, static: Mapping[str, str],
                 ttl_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._static = dict(static)
        self._ttl_s = ttl_s
        self._live = LiveModels()

    async def live(self, fresh: bool = False) -> LiveModels:
        """The live daemons, read again when older than ``ttl_s`` (or when ``fresh``)."""
        if fresh or time.monotonic() - self._live.read_at >= self._ttl_s:
            self._live = await self._read()
        return self._live

    async def _read(self) -> LiveModels:
        members = await self._client.zrange(daemons_key(self._prefix), 0, -1)
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        raws = await self._client.mget([daemon_key(i, self._prefix) for i in ids]) if ids else []
        beats = sorted((b for b in map(parse_heartbeat, raws) if b is not None),
                       key=lambda b: b.daemon_id)
        queues: dict[str, str] = {}
        for beat in beats:  # a heartbeat key exists only while its daemon lives (a PX TTL)
            queues.setdefault(beat.model, beat.queue)
            queues.setdefault(beat.queue, beat.queue)
        return LiveModels(queues, beats, time.monotonic())

    async def resolve(self, model: str) -> str:
        """The queue serving ``model``; raise a 404 or a 503 (see the module docstring)."""
        live = await self.live()
        if model not in live.queues:  # a daemon may have started since the last reading
            live = await self.live(fresh=True)
        if model in live.queues:
            return live.queues[model]
        queue = self._static.get(model)
        if queue is not None and live.served(queue):
            return queue
        if queue is not None or not live.beats:
            raise APIError(503, f"no daemon is serving the model {model!r} right now",
                           "service_unavailable", "model", "model_not_served")
        raise APIError(404, f"The model {model!r} does not exist", "invalid_request_error",
                       "model", "model_not_found")
