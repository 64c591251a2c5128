"""Writing a daemon's request streams: fenced writes in one pipeline per round, then acks.

A mixin of ``Daemon`` (the way an I/O mixin keeps transport out of a scheduler): it owns the
flush loop and decides, from each write's answer, whether an attempt finished (ack its entry),
was cancelled, or lost its request to another attempt (drop it, never ack).
"""

from __future__ import annotations

import asyncio

from helix_daemon.server.attempt import Attempt
from helix_daemon.server.daemon_state import DaemonState
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, now_ms
from helix_daemon.wire.store import Append, entry_ms


class StreamWriterMixin(DaemonState):
    """Flush loop, write outcomes, retiring attempts and acking their entries."""

    async def _flush_loop(self) -> None:
        failures = 0
        while not self._closing.is_set():
            await self._flush_needed.wait()
            self._flush_needed.clear()
            try:
                await self._flush_once(list(self.active.values()))
                failures = 0
            except REDIS_ERRORS as e:
                # Nothing is dropped: unsent writes stay queued (and keep coalescing) and are
                # retried with the same seq, which the script answers 'dup' if it had landed.
                self.log.warning("flush failed, retrying", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
                self._flush_needed.set()

    async def _flush_once(self, attempts: list[Attempt]) -> None:
        ops = [(a, op) for a in attempts for op in a.pending]
        if ops:
            replies = await self.store.append_many([op for _, op in ops], now_ms())
            for (attempt, op), reply in zip(ops, replies):
                self._settle(attempt, op, reply)
        if self._acks:
            acks = self._acks[:]
            await self.store.ack(acks)
            del self._acks[:len(acks)]
            self._slots_freed.set()

    def _settle(self, attempt: Attempt, op: Append, reply: str) -> None:
        """Act on one write's answer from the ``append`` script."""
        if reply in ("ok", "dup"):
            attempt.pending = [o for o in attempt.pending if o is not op]
            if op.terminal_state and self.active.get(attempt.request_id) is attempt:
                self._retire(attempt, ack=True)
            return
        if self.active.get(attempt.request_id) is not attempt:
            return  # already dropped by an earlier reply of this round
        if reply == "cancelled":
            attempt.outcome = "cancelled"
            self._retire(attempt, ack=True)
        else:  # fenced | gone | gap | script error: another attempt owns it, or it expired
            self.log.warning("write refused, dropping request", request_id=attempt.request_id,
                             reply=reply, epoch=attempt.epoch)
            attempt.outcome = reply
            self._retire(attempt, ack=False)

    def _retire(self, attempt: Attempt, ack: bool) -> None:
        """Forget an attempt; free its engine sequence; ack its entry once its end is durable."""
        if self.active.get(attempt.request_id) is attempt:
            del self.active[attempt.request_id]
            self._slots_freed.set()
        self._by_engine_id.pop(attempt.engine_id, None)
        if attempt.in_engine and self._worker is not None:
            self._worker.abort(attempt.engine_id)
            attempt.in_engine = False
        if ack:
            self._queue_ack(attempt.entry_id)
            self.metrics.inc_request(attempt.outcome or "unknown")
            self.metrics.observe_e2e(max(0.0, (now_ms() - entry_ms(attempt.entry_id)) / 1000))
            self.log.info("request finished", request_id=attempt.request_id,
                          outcome=attempt.outcome, attempt=attempt.epoch)

    def _queue_ack(self, entry_id: str) -> None:
        self._acks.append(entry_id)
        self._flush_needed.set()

