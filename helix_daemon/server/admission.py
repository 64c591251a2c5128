"""Admission: from queue entries to running attempts.

A batch of entries is decoded, its valid requests claimed in one round trip, and each request
this daemon now runs is started in the engine, resumed from what an earlier attempt already
streamed. A new entry gets a head start: it enters the engine before its claim is sent (see
``head_start.py``). Entries that cannot run (undecodable, poison, finished) are settled here.
"""

from __future__ import annotations

from typing import Any

from helix_daemon.config import DaemonConfig
from helix_daemon.engine.chat import ChatPrompt
from helix_daemon.engine_host.messages import AddCommand, StepResult
from helix_daemon.engine_host.protocols import EngineHandle
from helix_daemon.server.attempts import Attempt, AttemptTable
from helix_daemon.server.head_start import HeadStarts
from helix_daemon.server.metrics import DaemonMetrics
from helix_daemon.wire import protocol as p
from helix_daemon.wire.retry import REDIS_ERRORS, now_ms
from helix_daemon.wire.store import Claim, ClaimRequest, Entry, Store, entry_ms
from scheduler.errors import InvalidRequestError

Wanted = tuple[ClaimRequest, dict[bytes, bytes]]


class Admission:
    """Claims entries and starts their requests; owns the head starts awaiting a claim."""

    def __init__(self, config: DaemonConfig, store: Store, table: AttemptTable,
                 engine: EngineHandle, metrics: DaemonMetrics, log: Any) -> None:
        self._config = config
        self._store = store
        self._table = table
        self._engine = engine
        self._metrics = metrics
        self._log = log
        self.head_starts = HeadStarts(engine.add, engine.abort)

    def hold_head_starts(self, result: StepResult) -> None:
        """Keep a step's outputs of sequences whose claim has not answered yet."""
        self.head_starts.hold(result)

    async def admit_safely(self, entries: list[Entry], takeover: bool = False,
                           head_start: bool = False) -> None:
        """Admit ``entries``; on a Redis failure, leave them to their lease."""
        # A Redis failure here leaves the entries pending and not renewed: their leases lapse
        # and they are claimed again later (by anyone), so dropping them locally loses nothing.
        if not entries:
            return
        try:
            await self._admit(entries, takeover, head_start)
        except REDIS_ERRORS as e:
            self._log.warning("admission failed, entries left to their lease",
                              entry_ids=[entry_id for entry_id, _ in entries], error=repr(e))
            ids = {entry_id for entry_id, _ in entries}
            for attempt in [a for a in self._table.attempts() if a.entry_id in ids]:
                self._table.retire(attempt, ack=False)

    async def _admit(self, entries: list[Entry], takeover: bool, head_start: bool) -> None:
        """Decode a batch of entries, claim the valid ones in one round trip, start them.

        With ``head_start`` (entries never delivered before) each valid request starts in the
        engine before the claim is sent (see ``head_start.py``).
        """
        wanted: list[tuple[ClaimRequest, dict[bytes, bytes], p.Request]] = []
        for entry_id, fields in entries:
            try:
                request = p.decode_request(fields, entry_id)
            except p.BadEntryError as e:
                await self._reject_entry(entry_id, fields, e)
                continue
            ttl_s = request.body.result_ttl_s or self._config.result_ttl_s
            wanted.append((ClaimRequest(request.request_id, entry_id, entry_ms(entry_id),
                                        ttl_s * 1000), fields, request))
        started = [self._head_start(claim.entry_id, request) if head_start else None
                   for claim, _, request in wanted]
        try:
            attempts = await self._claim_many([(claim, fields) for claim, fields, _ in wanted])
            for (_, _, request), attempt, engine_id in zip(wanted, attempts, started):
                if attempt is None:
                    continue
                if takeover:
                    self._log.info("took over request", request_id=attempt.request_id,
                                   epoch=attempt.epoch, resume_from=attempt.next_off)
                if engine_id is not None and attempt.next_off == 0:
                    self._adopt(attempt, request, engine_id)
                else:
                    await self._start(attempt, request)
        finally:
            for engine_id in started:
                if engine_id is not None:
                    self.head_starts.drop(engine_id)  # a no-op for adopted ones

    def _head_start(self, entry_id: str, request: p.Request) -> str | None:
        """Start a request in the engine before its claim; None if it cannot run as it is."""
        body = request.body
        deadline = _deadline_ms(entry_id, body)
        if deadline is not None and now_ms() >= deadline:
            return None  # _start reports the timeout
        try:
            params = p.to_request_params(body)
        except InvalidRequestError:
            return None  # _start reports it once the claim lets this daemon write
        return self.head_starts.start(AddCommand(f"{request.request_id}@{entry_id}",
                                                 _prompt(body), params))

    def _adopt(self, attempt: Attempt, request: p.Request, engine_id: str) -> None:
        """The claim confirmed a head start: the attempt takes over its engine sequence."""
        self._table.adopt(attempt, engine_id)
        attempt.deadline_ms = _deadline_ms(attempt.entry_id, request.body)
        outputs, rejected = self.head_starts.adopt(engine_id)
        self._table.apply(outputs, rejected)
        # The engine may have finished it already: no step is left to ask for this flush.
        self._table.request_flush()

    async def _reject_entry(self, entry_id: str, fields: dict[bytes, bytes],
                            error: p.BadEntryError) -> None:
        """Undecodable entry: dead letter, plus an ``error`` event when it names a request."""
        self._log.warning("bad entry", entry_id=entry_id, request_id=error.request_id,
                          reason=str(error))
        await self._store.dead_letter(entry_id, error.request_id, f"{error.code}: {error}",
                                      fields)
        if error.request_id is None:
            self._table.queue_ack(entry_id)
            return
        claim = ClaimRequest(error.request_id, entry_id, entry_ms(entry_id),
                             self._config.result_ttl_s * 1000)
        [attempt] = await self._claim_many([(claim, fields)])
        if attempt is not None:
            attempt.fail(error.code, str(error))
            self._table.request_flush()

    async def _claim_many(self, wanted: list[Wanted]) -> list[Attempt | None]:
        """Claim each request; an ``Attempt`` for those this daemon now runs, else None."""
        now = now_ms()
        claims = await self._store.claim_many([claim for claim, _ in wanted], now_ms=now,
                                              max_attempts=self._config.max_attempts)
        return [await self._settle_claim(request, fields, claim, now)
                for (request, fields), claim in zip(wanted, claims)]

    async def _settle_claim(self, request: ClaimRequest, fields: dict[bytes, bytes],
                            claim: Claim, now: int) -> Attempt | None:
        request_id, entry_id = request.request_id, request.entry_id
        if claim.status != "ok":
            self._log.info("request settled at claim", request_id=request_id,
                           status=claim.status)
            if claim.status == "poison":
                await self._store.dead_letter(entry_id, request_id,
                                              f"poison: {claim.attempts - 1} attempts", fields)
                self._metrics.inc_request("poison")
            self._table.queue_ack(entry_id)
            return None
        attempt = Attempt(request_id, entry_id, self._config.daemon_id, claim.epoch,
                          claim.attempts, claim.next_seq, claim.next_off, request.result_ttl_ms,
                          queue_wait_s=max(0.0, (now - entry_ms(entry_id)) / 1000))
        self._table.add(attempt)
        return attempt

    async def _start(self, attempt: Attempt, request: p.Request) -> None:
        """Validate, resume from what was already streamed, and hand it to the engine."""
        body = request.body
        attempt.deadline_ms = _deadline_ms(attempt.entry_id, body)
        try:
            params = p.to_request_params(body)
        except InvalidRequestError as e:
            attempt.fail(e.code, str(e))
            self._table.request_flush()
            return
        forced: list[int] = []
        if attempt.next_off:
            forced = await self._store.committed_token_ids(attempt.request_id)
            if len(forced) != attempt.next_off:
                attempt.fail("engine_error", "streamed tokens cannot be recovered")
        if attempt.is_expired(now_ms()):
            attempt.fail("timeout", "timeout_s expired before the request ran")
        elif not attempt.terminal and len(forced) >= params.max_tokens:
            attempt.num_output_tokens = len(forced)
            attempt.done("length")
        if attempt.terminal:
            self._table.request_flush()
            return
        attempt.in_engine = True
        self._engine.add(AddCommand(attempt.engine_id, _prompt(body), params, forced))


def _deadline_ms(entry_id: str, body: p.RequestBody) -> int | None:
    if body.timeout_s is None:
        return None
    return entry_ms(entry_id) + int(body.timeout_s * 1000)


def _prompt(body: p.RequestBody) -> str | list[int] | ChatPrompt:
    """The body's one prompt form (``to_request_params`` checked there is exactly one)."""
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return ChatPrompt(messages, dict(body.chat_template_kwargs or {}))
    return body.prompt if body.prompt is not None else list(body.prompt_token_ids or [])
