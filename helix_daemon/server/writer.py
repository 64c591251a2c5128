"""Writing a daemon's request streams: fenced writes in one pipeline per round, then acks.

The ``StreamWriter`` owns the flush loop (the way an I/O part keeps transport out of a
scheduler). It decides, from each write's answer, whether an attempt finished (retire it and
ack its entry), was cancelled, or lost its request to another attempt (retire it, never ack).
"""

from __future__ import annotations

import asyncio
from typing import Any

from helix_daemon.server.attempts import Attempt, AttemptTable
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, now_ms
from helix_daemon.wire.store import Append, Store


class StreamWriter:
    """Sends the attempts' queued writes and the table's acks whenever a flush is wanted."""

    def __init__(self, store: Store, table: AttemptTable, closing: asyncio.Event,
                 log: Any) -> None:
        self._store = store
        self._table = table
        self._closing = closing  # set when the daemon's background loops are to end
        self._log = log

    async def run(self) -> None:
        """The flush loop: one round per wake-up; a failed round is retried, losing nothing."""
        failures = 0
        flush_wanted = self._table.flush_wanted
        while not self._closing.is_set():
            await flush_wanted.wait()
            flush_wanted.clear()
            try:
                await self.flush_once(self._table.attempts())
                failures = 0
            except REDIS_ERRORS as e:
                # Nothing is dropped: unsent writes stay queued (and keep coalescing) and are
                # retried with the same seq, which the script answers 'dup' if it had landed.
                self._log.warning("flush failed, retrying", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
                flush_wanted.set()

    async def flush_once(self, attempts: list[Attempt]) -> None:
        """Send the queued writes of ``attempts`` in one pipeline, then every queued ack."""
        ops = [(a, op) for a in attempts for op in a.pending]
        if ops:
            replies = await self._store.append_many([op for _, op in ops], now_ms())
            for (attempt, op), reply in zip(ops, replies):
                self._settle(attempt, op, reply)
        acks = self._table.acks_to_send()
        if acks:
            await self._store.ack(acks)
            self._table.acks_sent(acks)

    def _settle(self, attempt: Attempt, op: Append, reply: str) -> None:
        """Act on one write's answer from the ``append`` script."""
        table = self._table
        if reply in ("ok", "dup"):
            attempt.pending = [o for o in attempt.pending if o is not op]
            if op.terminal_state and table.runs(attempt):
                table.retire(attempt, ack=True)
            return
        if not table.runs(attempt):
            return  # already dropped by an earlier reply of this round
        if reply == "cancelled":
            attempt.outcome = "cancelled"
            table.retire(attempt, ack=True)
        else:  # fenced | gone | gap | script error: another attempt owns it, or it expired
            self._log.warning("write refused, dropping request", request_id=attempt.request_id,
                              reply=reply, epoch=attempt.epoch)
            attempt.outcome = reply
            table.retire(attempt, ack=False)
