"""Keeping a daemon's claims alive and honest: leases, heartbeat, cancels and deadlines.

A mixin of ``Daemon``. Leases are renewed only while the engine makes progress, so a hung
device loses its requests to another daemon; cancels arrive by pub/sub (fast) and by a sweep of
the meta flags (durable); expired ``timeout_s`` deadlines end requests with ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import redis.asyncio as aioredis

from helix_daemon.server.attempt import Attempt
from helix_daemon.server.daemon_state import DaemonState
from helix_daemon.wire import protocol as p
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, now_ms


class UpkeepMixin(DaemonState):
    """Lease renewal, heartbeat, cancellation and deadline sweeps of one daemon."""

    client: aioredis.Redis
    _stall_s: float
    _spec: tuple[int, int]
    _tokens_window: int  # tokens generated since _window_start (the last heartbeat)
    _window_start: float
    _started_ms: int

    async def _lease_loop(self) -> None:
        period_s = min(self.config.lease_ms / 3000, self.config.heartbeat_interval_s)
        next_beat = 0.0
        while not self._closing.is_set():
            try:
                await self._renew_leases()
                if time.monotonic() >= next_beat:
                    await self._heartbeat()
                    next_beat = time.monotonic() + self.config.heartbeat_interval_s
                for request_id in await self.store.cancel_requested(list(self.active)):
                    self.cancel(request_id)
            except REDIS_ERRORS as e:
                self.log.warning("lease round failed", error=repr(e))
            self._expire_deadlines()
            # not a plain sleep: redis-py can swallow a cancel that lands mid-command, and the
            # daemon's shutdown must not then wait out a whole period
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), period_s)

    async def _renew_leases(self) -> None:
        assert self._worker is not None
        if self._worker.is_stalled(self._stall_s):
            self.log.error("engine stalled, not renewing leases")
            return
        ids = [a.entry_id for a in self.active.values()]
        if ids:
            await self.store.renew(ids)

    async def _heartbeat(self) -> None:
        stats = self.engine_stats
        now = time.monotonic()
        window_s = max(now - self._window_start, 1e-3)
        self._window_start = now
        proposed, accepted = self._spec
        beat = p.Heartbeat(
            daemon_id=self.config.daemon_id, model=self.config.model,
            device=self._worker.info.device if self._worker and self._worker.info
            else self.config.device,
            queue=self.config.queue, pid=os.getpid(),
            running=getattr(stats, "num_running", 0), waiting=getattr(stats, "num_waiting", 0),
            kv_blocks_used=getattr(stats, "kv_blocks_used", 0),
            kv_blocks_total=getattr(stats, "kv_blocks_total", 0),
            tokens_per_s=round(self._tokens_window / window_s, 3),
            acceptance_rate=round(accepted / proposed, 6) if proposed else None,
            started_ms=self._started_ms)
        self._tokens_window = 0
        await self.store.heartbeat(beat, self.config.heartbeat_ttl_ms, now_ms())

    def cancel(self, request_id: str) -> None:
        """Stop a request within one step: abort it in the engine and write ``cancelled``."""
        attempt = self.active.get(request_id)
        if attempt is None or attempt.terminal:
            return
        self._abort_in_engine(attempt)
        attempt.cancel("cancelled by client")
        self._flush_needed.set()

    def _abort_in_engine(self, attempt: Attempt) -> None:
        if attempt.in_engine and self._worker is not None:
            self._worker.abort(attempt.engine_id)
            attempt.in_engine = False

    def _expired(self, attempt: Attempt) -> bool:
        return attempt.deadline_ms is not None and now_ms() > attempt.deadline_ms

    def _expire_deadlines(self) -> None:
        for attempt in list(self.active.values()):
            if not attempt.terminal and self._expired(attempt):
                self._abort_in_engine(attempt)
                attempt.fail("timeout", "timeout_s expired")
                self._flush_needed.set()

    async def _cancel_listener(self) -> None:
        failures = 0
        while not self._closing.is_set():
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(p.cancel_channel(self.config.key_prefix))
                    failures = 0
                    while not self._closing.is_set():
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is not None:
                            self.cancel(message["data"].decode("utf-8", "replace"))
            except REDIS_ERRORS as e:
                self.log.warning("cancel listener reconnecting", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1


