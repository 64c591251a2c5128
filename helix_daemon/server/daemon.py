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

Each piece of state has one owner, wired together here: the ``AttemptTable`` (attempts and
acks), ``Admission`` (claims and head starts), the ``StreamWriter`` (flushes), ``Upkeep``
(leases, heartbeat, cancels, deadlines) and the ``ThroughputWindow`` (heartbeat counters). The
``Daemon`` itself keeps the lifecycle, intake, reclaim and the engine's latest stats.

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
from helix_daemon.engine.outputs import EngineStats
from helix_daemon.engine_host.load import load_engine
from helix_daemon.engine_host.messages import StepResult
from helix_daemon.engine_host.process import EngineProcess, EngineProcessError
from helix_daemon.engine_host.protocols import EngineHandle, StepEngine
from helix_daemon.engine_host.thread import EngineThread
from helix_daemon.server.admission import Admission
from helix_daemon.server.attempts import AttemptTable
from helix_daemon.server.metrics import DaemonMetrics
from helix_daemon.server.throughput import ThroughputWindow
from helix_daemon.server.upkeep import Upkeep
from helix_daemon.server.writer import StreamWriter
from helix_daemon.wire.retry import REDIS_ERRORS, backoff, jittered, now_ms
from helix_daemon.wire.store import Store

log = structlog.get_logger("helix.daemon")

_READ_BLOCK_MS = 500
_FULL_RECHECK_S = 0.1  # a full daemon looks again at least this often


class Daemon:
    """One daemon on one queue; ``run()`` returns the process exit code."""

    def __init__(self, config: DaemonConfig, engine: StepEngine | None, client: aioredis.Redis,
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
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the engine is loaded and intake has started
        # Set before background tasks are cancelled: a loop whose cancellation got turned into
        # a timeout inside a client library still ends.
        self._closing = asyncio.Event()
        self._pulling = True  # intake and reclaim run until a stop is requested
        self._fatal: BaseException | None = None
        self._started_ms = now_ms()
        self._engine_stats: EngineStats | None = None  # from the latest StepResult
        self._window = ThroughputWindow()
        self._handle: EngineHandle | None = None
        self._table = AttemptTable(self._abort_in_engine, self.metrics, self._window, self.log)
        # The owners that act on the engine, wired in _compose once its handle exists:
        self._admission: Admission
        self._writer: StreamWriter
        self._upkeep: Upkeep

    @property
    def engine_stats(self) -> EngineStats | None:
        """The engine's stats after its latest step (its starting stats until then; None
        before the engine has started)."""
        return self._engine_stats

    def _abort_in_engine(self, engine_id: str) -> None:
        if self._handle is not None:
            self._handle.abort(engine_id)

    # --- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop pulling, drain, hand the rest back, exit 0."""
        self.log.info("stop requested")
        self._stop.set()
        if self._handle is not None and self._handle.info is None:
            self._handle.kill()  # still loading the model: nothing to drain

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
            if self._handle is not None:
                self._handle.kill()

    async def _launch(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        await self._start_engine()  # should what follows fail, run() ends the engine
        return await self._start_tasks()

    async def _start_engine(self) -> None:
        """The engine in a process of its own, or in a thread: the caller's engine, or the
        configured model when ``engine_process`` is off."""
        loop = asyncio.get_running_loop()
        handle: EngineHandle
        if self.engine is None and self.config.engine_process:
            handle = self._handle = EngineProcess(self.config.engine_config(), loop, self._on_step)
            self._compose(handle)
            await asyncio.to_thread(handle.start)  # loads the model
        else:
            if self.engine is None:
                self.engine = await asyncio.to_thread(load_engine, self.config.engine_config())
            handle = self._handle = EngineThread.on_loop(self.engine, loop, self._on_step)
            self._compose(handle)  # before the start: the first result (stats) may come at once
            await asyncio.to_thread(handle.start)

    def _compose(self, engine: EngineHandle) -> None:
        """Wire the owners around the engine's handle (before any step can be delivered)."""
        table = self._table
        self._admission = Admission(self.config, self.store, table, engine, self.metrics,
                                    self.log)
        self._writer = StreamWriter(self.store, table, self._closing, self.log)
        self._upkeep = Upkeep(self.config, self.store, self.client, table, engine,
                              window=self._window, engine_stats=lambda: self._engine_stats,
                              started_ms=self._started_ms, closing=self._closing, log=self.log)

    async def _start_tasks(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        assert self._handle is not None and self._handle.info is not None
        await self._until_ok(self.store.ensure_group)
        self.metrics.start_http(self.config.metrics_port)
        background = [self._supervised("flush", self._writer.run()),
                      self._supervised("lease", self._upkeep.lease_loop()),
                      self._supervised("cancel_listener", self._upkeep.cancel_listener())]
        await self._recover_own_entries()
        pulling = [self._supervised("intake", self._intake_loop()),
                   self._supervised("reclaim", self._reclaim_loop())]
        info = self._handle.info
        self.log.info("daemon started", queue=self.config.queue, model=self.config.model,
                      engine=type(self._handle).__name__, device=info.device,
                      kv_blocks=info.kv_blocks, kv_block_size=info.kv_block_size,
                      kv_bytes=info.kv_bytes, linear_form=info.linear_form,
                      weight_bytes=info.weight_bytes, quantization=info.quantization)
        self.ready.set()
        return background, pulling

    def _supervised(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task whose crash ends the daemon (exit 1) instead of leaving it half alive: a
        daemon that heartbeats but no longer pulls or writes would hold its entries forever."""
        task = asyncio.create_task(coro, name=name)

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
        assert self._handle is not None
        await asyncio.to_thread(self._handle.stop)
        self.metrics.stop_http()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.store.unregister()
        self.log.info("daemon stopped", fatal=repr(self._fatal) if self._fatal else None)

    async def _drain(self) -> None:
        """Let running requests finish for drain_timeout_s, then hand the rest back at once."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while len(self._table) and self._fatal is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = self._table.attempts()
        for attempt in leftover:
            self._table.retire(attempt, ack=False)
        with contextlib.suppress(*REDIS_ERRORS, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.flush_once(leftover), timeout=5.0)
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
        """How many more requests the engine can admit soon (0 while the KV pool is full;
        before the engine has started there are no stats, hence no KV pressure)."""
        stats = self.engine_stats
        if stats is not None and stats.kv_blocks_total and \
                stats.kv_blocks_used / stats.kv_blocks_total >= self.config.kv_high_watermark:
            return 0
        held = self._table.num_held  # acks not sent yet count: the queue sees them held
        return max(0, self.config.max_num_seqs + self.config.max_waiting - held)

    async def _recover_own_entries(self) -> None:
        """After a restart under the same name, our unacked entries come back at once."""
        entries = await self._until_ok(self.store.read_own_pending) or []
        await self._admission.admit_safely(entries)
        if entries:
            self.log.info("recovered own pending entries", count=len(entries))

    async def _intake_loop(self) -> None:
        failures = 0
        while self._pulling:
            free = self.free_slots()
            if free <= 0:
                # Woken when an ack, a drop or a step may have freed a slot: polling on a timer
                # would leave a finished request's slot empty for the rest of the period.
                slots_freed = self._table.slots_freed
                slots_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(slots_freed.wait(), _FULL_RECHECK_S)
                continue
            try:
                entries = await self.store.read_new(free, _READ_BLOCK_MS)
                failures = 0
            except REDIS_ERRORS as e:
                self.log.warning("intake failed", error=repr(e))
                await asyncio.sleep(backoff(failures))
                failures += 1
                continue
            await self._admission.admit_safely(entries, head_start=True)

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
                    self._table.queue_ack(entry_id)
            except REDIS_ERRORS as e:
                self.log.warning("reclaim failed", error=repr(e))
                continue
            await self._admission.admit_safely(
                [(entry_id, fields) for entry_id, fields in claimed
                 if not self._table.runs_entry(entry_id)], takeover=True)

    # --- engine results -------------------------------------------------------------------

    def _on_step(self, result: StepResult) -> None:
        """Runs on the loop for every engine step: turn outputs into queued writes."""
        if result.fatal is not None:
            self.log.error("engine failed", error=repr(result.fatal))
            self._fatal = result.fatal
            self._stop.set()
            return
        self._admission.hold_head_starts(result)
        self._table.apply(result.outputs, result.rejected)
        if result.stats is not None:
            self._observe_stats(result.stats)
        self._table.request_flush()
        self._table.slots_freed.set()  # KV use changed

    def _observe_stats(self, stats: EngineStats) -> None:
        previous, self._engine_stats = self._engine_stats, stats
        self.metrics.set_running(stats.num_running)
        self.metrics.set_waiting(stats.num_waiting)
        if stats.kv_blocks_total:
            self.metrics.set_kv_usage(stats.kv_blocks_used / stats.kv_blocks_total)
        # the engine reports running totals; Prometheus counters take what is new since
        proposed, accepted = (previous.num_draft_proposed, previous.num_draft_accepted) \
            if previous is not None else (0, 0)
        self.metrics.add_spec_tokens(stats.num_draft_proposed - proposed,
                                     stats.num_draft_accepted - accepted)
        queried, hit = (previous.prefix_cache_queries, previous.prefix_cache_hits) \
            if previous is not None else (0, 0)
        self.metrics.add_prefix_cache(stats.prefix_cache_queries - queried,
                                      stats.prefix_cache_hits - hit)


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
