"""Keeping a daemon's claims alive and honest: leases, heartbeat, cancels and deadlines.

Leases are renewed only while the engine makes progress, so a hung device loses its requests to
another daemon; cancels arrive by pub/sub (fast) and by a sweep of the meta flags (durable);
expired ``timeout_s`` deadlines end requests with ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from helix_daemon.config import DaemonConfig
from helix_daemon.engine.outputs import EngineStats
from helix_daemon.engine_host.protocols import EngineHandle
from helix_daemon.server.attempts import Attempt, AttemptTable
from helix_daemon.server.throughput import ThroughputWindow
from helix_daemon.wire import protocol as p
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, now_ms
from helix_daemon.wire.store import Store


class Upkeep:
    """Lease renewal, heartbeat, cancellation and deadline sweeps of one daemon."""

    def __init__(self, config: DaemonConfig, store: Store, client: aioredis.Redis,
                 table: AttemptTable, engine: EngineHandle, *, window: ThroughputWindow,
                 engine_stats: Callable[[], EngineStats | None], started_ms: int,
                 closing: asyncio.Event, log: Any) -> None:
        self._config = config
        self._store = store
        self._client = client  # for the cancel channel's pub/sub
        self._table = table
        self._engine = engine
        self._window = window
        self._engine_stats = engine_stats
        self._started_ms = started_ms
        self._closing = closing  # set when the daemon's background loops are to end
        self._log = log
        # A step running longer than this means a hung device: stop renewing leases.
        self._stall_s = max(3 * config.lease_ms / 1000, 10.0)

    async def lease_loop(self) -> None:
        """Renew leases, beat, sweep cancels and deadlines, until the daemon closes."""
        config = self._config
        period_s = min(config.lease_ms / 3000, config.heartbeat_interval_s)
        next_beat = 0.0
        while not self._closing.is_set():
            try:
                await self._renew_leases()
                if time.monotonic() >= next_beat:
                    await self._heartbeat()
                    next_beat = time.monotonic() + config.heartbeat_interval_s
                for request_id in await self._store.cancel_requested(self._table.request_ids()):
                    self.cancel(request_id)
            except REDIS_ERRORS as e:
                self._log.warning("lease round failed", error=repr(e))
            self._expire_deadlines()
            # not a plain sleep: redis-py can swallow a cancel that lands mid-command, and the
            # daemon's shutdown must not then wait out a whole period
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), period_s)

    async def _renew_leases(self) -> None:
        if self._engine.is_stalled(self._stall_s):
            self._log.error("engine stalled, not renewing leases")
            return
        ids = [a.entry_id for a in self._table.attempts()]
        if ids:
            await self._store.renew(ids)

    async def _heartbeat(self) -> None:
        config, stats, info = self._config, self._engine_stats(), self._engine.info
        # draft tokens accepted over proposed, over the engine's life (None: none drafted)
        acceptance = stats.num_draft_accepted / stats.num_draft_proposed \
            if stats and stats.num_draft_proposed else None
        # prompt tokens served from the prefix cache over those looked up (None: no lookups)
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries \
            if stats and stats.prefix_cache_queries else None
        beat = p.Heartbeat(
            daemon_id=config.daemon_id, model=config.model,
            device=info.device if info else config.device, queue=config.queue, pid=os.getpid(),
            running=stats.num_running if stats else 0,
            waiting=stats.num_waiting if stats else 0,
            kv_blocks_used=stats.kv_blocks_used if stats else 0,
            kv_blocks_total=stats.kv_blocks_total if stats else 0,
            tokens_per_s=round(self._window.close(), 3),
            acceptance_rate=None if acceptance is None else round(acceptance, 6),
            started_ms=self._started_ms,
            prefix_cache_hit_rate=None if hit_rate is None else round(hit_rate, 6),
            weight_bytes=info.weight_bytes if info else 0,
            quantization=info.quantization if info else "none")
        await self._store.heartbeat(beat, config.heartbeat_ttl_ms, now_ms())

    def cancel(self, request_id: str) -> None:
        """Stop a request within one step: abort it in the engine and write ``cancelled``."""
        attempt = self._table.get(request_id)
        if attempt is None or attempt.terminal:
            return
        self._table.abort_in_engine(attempt)
        attempt.cancel("cancelled by client")
        self._table.request_flush()

    def _expire_deadlines(self) -> None:
        now = now_ms()
        for attempt in self._table.attempts():
            if not attempt.terminal and attempt.is_expired(now):
                self._end_expired(attempt)

    def _end_expired(self, attempt: Attempt) -> None:
        self._table.abort_in_engine(attempt)
        attempt.fail("timeout", "timeout_s expired")
        self._table.request_flush()

    async def cancel_listener(self) -> None:
        """Cancel requests named on the cancel channel (reconnecting as long as it takes)."""
        failures = 0
        while not self._closing.is_set():
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(p.cancel_channel(self._config.key_prefix))
                    failures = 0
                    while not self._closing.is_set():
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is not None:
                            self.cancel(message["data"].decode("utf-8", "replace"))
            except REDIS_ERRORS as e:
                self._log.warning("cancel listener reconnecting", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
