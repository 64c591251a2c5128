"""The asyncio daemon: pull requests from a Redis stream, stream tokens back, survive failures.

Tasks (one event loop) around one engine, in a process of its own (``EngineProcess``, the
default) or in a thread of the daemon (``EngineThread``, for an engine built by the caller):

* intake: ``XREADGROUP >`` for as many entries as the engine can admit soon;
* reclaim: ``XAUTOCLAIM`` entries whose owner stopped renewing its lease, and resume them;
* lease: renew our entries (only while the engine makes progress), heartbeat, cancel/timeout
  sweeps;
* flush: one pipeline of fenced writes per round (every step's events, retried until Redis
  answers), then acks of requests whose terminal event is durable;
* cancel listener: pub/sub nudges so a cancel lands within one step.

Run: ``python -m helix_daemon.daemon`` (settings from HELIX_* variables, see ``DaemonConfig``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
import structlog

from helix_daemon.config import DaemonConfig
from helix_daemon.engine.outputs import EngineStats, RequestOutput
from helix_daemon.engine_host.load import load_engine
from helix_daemon.engine_host.messages import AddCommand, Rejection, StepResult
from helix_daemon.engine_host.process import EngineProcess, EngineProcessError
from helix_daemon.engine_host.protocols import EngineHandle
from helix_daemon.engine_host.thread import EngineThread
from helix_daemon.server.attempt import Attempt
from helix_daemon.server.head_start import HeadStarts
from helix_daemon.server.metrics import DaemonMetrics
from helix_daemon.server.upkeep import UpkeepMixin
from helix_daemon.server.writer import StreamWriterMixin
from helix_daemon.wire import protocol as p
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, jittered, now_ms
from helix_daemon.wire.store import Claim, ClaimRequest, Entry, Store, entry_ms
from scheduler.errors import InvalidRequestError

log = structlog.get_logger("helix.daemon")

_READ_BLOCK_MS = 500
_FULL_RECHECK_S = 0.1  # a full daemon looks again at least this often


class Daemon(StreamWriterMixin, UpkeepMixin):
    """One daemon on one queue; ``run()`` returns the process exit code."""

    def __init__(self, config: DaemonConfig, engine: Any, client: aioredis.Redis,
                 metrics: DaemonMetrics | None = None) -> None:
        """``engine``: an ``Engine`` to run in a thread, or None to load ``config.model``
        (in an engine process unless ``config.engine_process`` is off)."""
        self.config = config
        self.engine = engine
        self.store = Store(client, prefix=config.key_prefix, queue=config.queue,
                           daemon_id=config.daemon_id, lease_ms=config.lease_ms)
        self.client = client
        self.metrics = metrics or DaemonMetrics()
        self.log = log.bind(daemon_id=config.daemon_id)
        self.active: dict[str, Attempt] = {}  # request id -> the attempt this daemon runs
        self._by_engine_id: dict[str, Attempt] = {}
        self._acks: list[str] = []
        self._flush_needed = asyncio.Event()
        self._slots_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the engine is loaded and intake has started
        # Set before background tasks are cancelled: a loop whose cancellation got turned into
        # a timeout inside a client library still ends.
        self._closing = asyncio.Event()
        self._pulling = True  # intake and reclaim run until a stop is requested
        self._fatal: BaseException | None = None
        self._worker: EngineHandle | None = None
        self._engine_stats: EngineStats | None = None
        self._head_starts: HeadStarts  # created with the worker, in _launch
        self._started_ms = now_ms()
        self._tokens_window = 0
        self._window_start = time.monotonic()
        self._spec = (0, 0)  # engine draft counters at the last step (proposed, accepted)
        # A step running longer than this means a hung device: stop renewing leases.
        self._stall_s = max(3 * config.lease_ms / 1000, 10.0)

    # --- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop pulling, drain, hand the rest back, exit 0."""
        self.log.info("stop requested")
        self._stop.set()
        if self._worker is not None and self._worker.info is None:
            self._worker.kill()  # still loading the model: nothing to drain

    async def run(self) -> int:
        if self._stop.is_set():  # stopped before it started: load nothing
            return 0
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                background, pulling = await self._launch()
            except EngineProcessError as e:  # nothing was taken yet: say why and exit
                if self._stop.is_set():
                    self.log.info("stopped while the engine was loading")
                    return 0
                self.log.error("engine failed to start", error=str(e))
                return 1
            tasks = background + pulling
            await self._stop.wait()
            await self._shutdown(background, pulling)
            return 0 if self._fatal is None else 1
        finally:  # however run() ends (an error, a cancel), nothing it started outlives it
            self._pulling = False
            self._closing.set()  # loops end even where a library swallowed their cancel
            for task in tasks:
                task.cancel()
            if self._worker is not None:
                self._worker.kill()

    async def _launch(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        await self._start_engine()  # should what follows fail, run() ends the engine
        return await self._start_tasks()

    async def _start_engine(self) -> None:
        """The engine in a process of its own, or in a thread: the caller's engine, or the
        configured model when ``engine_process`` is off."""
        loop = asyncio.get_running_loop()
        worker: EngineHandle
        if self.engine is None and self.config.engine_process:
            worker = self._worker = EngineProcess(self.config.engine_config(), loop, self._on_step)
        else:
            if self.engine is None:
                self.engine = await asyncio.to_thread(load_engine, self.config.engine_config())
            worker = self._worker = EngineThread.on_loop(self.engine, loop, self._on_step)
        # before the engine starts: its first step result (the initial stats) may come at once
        self._head_starts = HeadStarts(worker.add, worker.abort)
        await asyncio.to_thread(worker.start)  # an engine process loads its model here

    async def _start_tasks(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        assert self._worker is not None and self._worker.info is not None
        await self._until_ok(self.store.ensure_group)
        self.metrics.start_http(self.config.metrics_port)
        background = [self._supervised(c) for c in (
            self._flush_loop(), self._lease_loop(), self._cancel_listener())]
        await self._recover_own_entries()
        pulling = [self._supervised(c) for c in (self._intake_loop(), self._reclaim_loop())]
        info = self._worker.info
        self.log.info("daemon started", queue=self.config.queue, model=self.config.model,
                      engine=type(self._worker).__name__, device=info.device,
                      kv_blocks=info.kv_blocks, kv_block_size=info.kv_block_size,
                      kv_bytes=info.kv_bytes, linear_form=info.linear_form)
        self.ready.set()
        return background, pulling

    def _supervised(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task whose crash ends the daemon (exit 1) instead of leaving it half alive: a
        daemon that heartbeats but no longer pulls or writes would hold its entries forever."""
        task = asyncio.create_task(coro, name=coro.__name__)

        def crashed(done: asyncio.Task[None]) -> None:
            if done.cancelled() or done.exception() is None or self._fatal is not None \
                    or self._closing.is_set():  # the background tasks are being cancelled
                return
            self.log.error("task crashed", task=done.get_name(), error=repr(done.exception()))
            self._fatal = done.exception()
            self._stop.set()

        task.add_done_callback(crashed)
        return task

    async def _shutdown(self, background: list[asyncio.Task[None]],
                        pulling: list[asyncio.Task[None]]) -> None:
        self._pulling = False
        await _cancel(pulling)
        if self._fatal is None:
            await self._drain()
        self._closing.set()
        await _cancel(background)
        assert self._worker is not None
        await asyncio.to_thread(self._worker.stop)
        self.metrics.stop_http()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.store.unregister()
        self.log.info("daemon stopped", fatal=repr(self._fatal) if self._fatal else None)

    async def _drain(self) -> None:
        """Let running requests finish for drain_timeout_s, then hand the rest back at once."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.active and self._fatal is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self.active.values())
        for attempt in leftover:
            self._retire(attempt, ack=False)
        with contextlib.suppress(*REDIS_ERRORS, asyncio.TimeoutError):
            await asyncio.wait_for(self._flush_once(leftover), timeout=5.0)
            await asyncio.wait_for(self.store.release([a.entry_id for a in leftover]), 5.0)
        if leftover:
            self.log.info("handed back unfinished requests", count=len(leftover))

    async def _until_ok(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Retry a startup call until Redis answers (None if a stop comes first)."""
        failures = 0
        while not self._stop.is_set():
            try:
                return await fn()
            except REDIS_ERRORS as e:
                self.log.warning("redis unavailable, retrying", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
        return None

    # --- taking requests ------------------------------------------------------------------

    def free_slots(self) -> int:
        """How many more requests the engine can admit soon (0 while the KV pool is full)."""
        stats = self.engine_stats
        if stats is not None and stats.kv_blocks_total and \
                stats.kv_blocks_used / stats.kv_blocks_total >= self.config.kv_high_watermark:
            return 0
        # Entries finished but not yet acked still count: the queue never sees us hold more.
        held = len(self.active) + len(self._acks)
        return max(0, self.config.max_num_seqs + self.config.max_waiting - held)

    async def _recover_own_entries(self) -> None:
        """After a restart under the same name, our unacked entries come back at once."""
        entries = await self._until_ok(self.store.read_own_pending) or []
        await self._admit_safely(entries)
        if entries:
            self.log.info("recovered own pending entries", count=len(entries))

    async def _intake_loop(self) -> None:
        failures = 0
        while self._pulling:
            free = self.free_slots()
            if free <= 0:
                # Woken when an ack, a drop or a step may have freed a slot: polling on a timer
                # would leave a finished request's slot empty for the rest of the period.
                self._slots_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slots_freed.wait(), _FULL_RECHECK_S)
                continue
            try:
                entries = await self.store.read_new(free, _READ_BLOCK_MS)
                failures = 0
            except REDIS_ERRORS as e:
                self.log.warning("intake failed", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
                continue
            await self._admit_safely(entries, head_start=True)

    async def _reclaim_loop(self) -> None:
        while self._pulling:
            await asyncio.sleep(jittered(self.config.reclaim_interval_s))
            free = self.free_slots()
            if free <= 0:
                continue
            try:
                claimed, deleted = await self.store.autoclaim(free)
                for entry_id in deleted:
                    await self.store.dead_letter(entry_id, None, "trimmed: deleted while pending",
                                                 None)
                    self._acks.append(entry_id)
            except REDIS_ERRORS as e:
                self.log.warning("reclaim failed", error=repr(e))
                continue
            await self._admit_safely([(entry_id, fields) for entry_id, fields in claimed
                                      if not self._runs_entry(entry_id)], takeover=True)

    def _runs_entry(self, entry_id: str) -> bool:
        return any(a.entry_id == entry_id for a in self.active.values())

    async def _admit_safely(self, entries: list[Entry], takeover: bool = False,
                            head_start: bool = False) -> None:
        # A Redis failure here leaves the entries pending and not renewed: their leases lapse
        # and they are claimed again later (by anyone), so dropping them locally loses nothing.
        if not entries:
            return
        try:
            await self._admit(entries, takeover, head_start)
        except REDIS_ERRORS as e:
            self.log.warning("admission failed, entries left to their lease",
                             entry_ids=[entry_id for entry_id, _ in entries], error=repr(e))
            ids = {entry_id for entry_id, _ in entries}
            for attempt in [a for a in self.active.values() if a.entry_id in ids]:
                self._retire(attempt, ack=False)

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
            ttl_s = request.body.result_ttl_s or self.config.result_ttl_s
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
                    self.log.info("took over request", request_id=attempt.request_id,
                                  epoch=attempt.epoch, resume_from=attempt.next_off)
                if engine_id is not None and attempt.next_off == 0:
                    self._adopt(attempt, request, engine_id)
                else:
                    await self._start(attempt, request)
        finally:
            for engine_id in started:
                if engine_id is not None:
                    self._head_starts.drop(engine_id)  # a no-op for adopted ones

    def _head_start(self, entry_id: str, request: p.Request) -> str | None:
        """Start a request in the engine before its claim; None if it cannot run as it is."""
        body = request.body
        deadline = self._deadline_ms(entry_id, body)
        if deadline is not None and now_ms() >= deadline:
            return None  # _start reports the timeout
        try:
            params = p.to_request_params(body)
        except InvalidRequestError:
            return None  # _start reports it once the claim lets this daemon write
        return self._head_starts.start(AddCommand(f"{request.request_id}@{entry_id}",
                                                  _prompt(body), params))

    def _adopt(self, attempt: Attempt, request: p.Request, engine_id: str) -> None:
        """The claim confirmed a head start: the attempt takes over its engine sequence."""
        self._by_engine_id.pop(attempt.engine_id, None)
        attempt.engine_id = engine_id
        self._by_engine_id[engine_id] = attempt
        attempt.in_engine = True
        attempt.deadline_ms = self._deadline_ms(attempt.entry_id, request.body)
        outputs, rejected = self._head_starts.adopt(engine_id)
        self._apply_results(outputs, rejected)
        # The engine may have finished it already: no step is left to ask for this flush.
        self._flush_needed.set()

    async def _reject_entry(self, entry_id: str, fields: dict[bytes, bytes],
                            error: p.BadEntryError) -> None:
        """Undecodable entry: dead letter, plus an ``error`` event when it names a request."""
        self.log.warning("bad entry", entry_id=entry_id, request_id=error.request_id,
                         reason=str(error))
        await self.store.dead_letter(entry_id, error.request_id, f"{error.code}: {error}",
                                     fields)
        if error.request_id is None:
            self._queue_ack(entry_id)
            return
        claim = ClaimRequest(error.request_id, entry_id, entry_ms(entry_id),
                             self.config.result_ttl_s * 1000)
        [attempt] = await self._claim_many([(claim, fields)])
        if attempt is not None:
            attempt.fail(error.code, str(error))
            self._flush_needed.set()

    async def _claim_many(self, wanted: list[tuple[ClaimRequest, dict[bytes, bytes]]]
                          ) -> list[Attempt | None]:
        """Claim each request; an ``Attempt`` for those this daemon now runs, else None."""
        now = now_ms()
        claims = await self.store.claim_many([claim for claim, _ in wanted], now_ms=now,
                                             max_attempts=self.config.max_attempts)
        return [await self._settle_claim(request, fields, claim, now)
                for (request, fields), claim in zip(wanted, claims)]

    async def _settle_claim(self, request: ClaimRequest, fields: dict[bytes, bytes],
                            claim: Claim, now: int) -> Attempt | None:
        request_id, entry_id = request.request_id, request.entry_id
        if claim.status != "ok":
            self.log.info("request settled at claim", request_id=request_id, status=claim.status)
            if claim.status == "poison":
                await self.store.dead_letter(entry_id, request_id,
                                             f"poison: {claim.attempts - 1} attempts", fields)
                self.metrics.inc_request("poison")
            self._queue_ack(entry_id)
            return None
        old = self.active.get(request_id)
        if old is not None:  # our own earlier attempt lost its lease and is now fenced
            self._retire(old, ack=False)
        attempt = Attempt(request_id, entry_id, self.config.daemon_id, claim.epoch,
                          claim.attempts, claim.next_seq, claim.next_off, request.result_ttl_ms,
                          queue_wait_s=max(0.0, (now - entry_ms(entry_id)) / 1000))
        self.active[request_id] = attempt
        self._by_engine_id[attempt.engine_id] = attempt
        return attempt

    async def _start(self, attempt: Attempt, request: p.Request) -> None:
        """Validate, resume from what was already streamed, and hand it to the engine."""
        body = request.body
        attempt.deadline_ms = self._deadline_ms(attempt.entry_id, body)
        try:
            params = p.to_request_params(body)
        except InvalidRequestError as e:
            attempt.fail(e.code, str(e))
            self._flush_needed.set()
            return
        forced: list[int] = []
        if attempt.next_off:
            forced = await self.store.committed_token_ids(attempt.request_id)
            if len(forced) != attempt.next_off:
                attempt.fail("engine_error", "streamed tokens cannot be recovered")
        if self._expired(attempt):
            attempt.fail("timeout", "timeout_s expired before the request ran")
        elif not attempt.terminal and len(forced) >= params.max_tokens:
            attempt.num_output_tokens = len(forced)
            attempt.done("length")
        if attempt.terminal:
            self._flush_needed.set()
            return
        attempt.in_engine = True
        assert self._worker is not None
        self._worker.add(AddCommand(attempt.engine_id, _prompt(body), params, forced))

    @staticmethod
    def _deadline_ms(entry_id: str, body: p.RequestBody) -> int | None:
        if body.timeout_s is None:
            return None
        return entry_ms(entry_id) + int(body.timeout_s * 1000)

    # --- engine results -------------------------------------------------------------------

    def _on_step(self, result: StepResult) -> None:
        """Runs on the loop for every engine step: turn outputs into queued writes."""
        if result.fatal is not None:
            self.log.error("engine failed", error=repr(result.fatal))
            self._fatal = result.fatal
            self._stop.set()
            return
        self._head_starts.hold(result)
        self._apply_results(result.outputs, result.rejected)
        self._observe_stats(result.stats)
        self._flush_needed.set()
        self._slots_freed.set()  # KV use changed

    def _apply_results(self, outputs: list[RequestOutput], rejected: list[Rejection]) -> None:
        for engine_id, code, message in ((r.engine_id, r.code, r.message) for r in rejected):
            attempt = self._by_engine_id.get(engine_id)
            if attempt is not None:
                attempt.in_engine = False
                attempt.fail(code, message)
        now = time.monotonic()
        for output in outputs:
            attempt = self._by_engine_id.get(output.request_id)
            if attempt is not None and not attempt.terminal:
                self._apply_output(attempt, output, now)

    def _apply_output(self, attempt: Attempt, output: Any, now: float) -> None:
        ids = list(output.new_token_ids)
        self._observe_tokens(attempt, ids, output.num_prompt_tokens, now)
        attempt.num_prompt_tokens = output.num_prompt_tokens
        attempt.num_output_tokens = output.num_output_tokens
        attempt.num_draft_proposed = output.num_draft_proposed
        attempt.num_draft_accepted = output.num_draft_accepted
        attempt.add_tokens(ids, output.text_delta)
        if output.finished:
            attempt.in_engine = False
            if output.finish_reason in ("stop", "length"):
                attempt.done(output.finish_reason)
            else:
                attempt.fail("engine_error", f"engine ended it ({output.finish_reason})")

    def _observe_tokens(self, attempt: Attempt, ids: list[int], num_prompt_tokens: int,
                        now: float) -> None:
        if attempt.num_prompt_tokens == 0:  # first output of this attempt: its prefill is done
            self.metrics.add_tokens(num_prompt_tokens, 0)
        if not ids:
            return
        if attempt.first_token_at is None:
            attempt.first_token_at = now
            self.metrics.observe_ttft(now - attempt.claimed_at)
        elif attempt.last_token_at is not None:
            self.metrics.observe_inter_token((now - attempt.last_token_at) / len(ids))
        attempt.last_token_at = now
        attempt.num_new_tokens += len(ids)
        self._tokens_window += len(ids)
        self.metrics.add_tokens(0, len(ids))

    def _observe_stats(self, stats: EngineStats | None) -> None:
        if stats is None:
            return
        self._engine_stats = stats
        self.metrics.set_running(stats.num_running)
        self.metrics.set_waiting(stats.num_waiting)
        if stats.kv_blocks_total:
            self.metrics.set_kv_usage(stats.kv_blocks_used / stats.kv_blocks_total)
        proposed, accepted = stats.num_draft_proposed, stats.num_draft_accepted
        self.metrics.add_spec_tokens(proposed - self._spec[0], accepted - self._spec[1])
        self._spec = (proposed, accepted)


def _prompt(body: p.RequestBody) -> str | list[int]:
    return body.prompt if body.prompt is not None else list(body.prompt_token_ids or [])


async def _cancel(tasks: list[asyncio.Task[Any]], timeout_s: float = 5.0) -> None:
    for task in tasks:
        task.cancel()
    _done, stuck = await asyncio.wait(tasks, timeout=timeout_s)
    if stuck:
        log.warning("tasks did not stop when cancelled", tasks=[t.get_name() for t in stuck],
                    awaiting=[_where(t) for t in stuck])


def _where(task: asyncio.Task[Any]) -> str:
    """The innermost line a task is suspended at (what it is waiting for)."""
    frames = task.get_stack()
    return f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
