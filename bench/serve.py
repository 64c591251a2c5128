"""Serving benchmark: the same workload through Redis (daemon + client) and in-process.

Producers enqueue a mixed workload at several arrival rates (Poisson, seeded; ``inf`` = all at
once). Each rate runs twice on one loaded engine:

* ``inproc``: requests go straight to an ``EngineThread`` (the daemon's engine thread), outputs
  come back through the event loop: the daemon minus Redis;
* ``redis``: requests are ``XADD``ed by the client, served by a ``Daemon`` on the same engine, and
  read back with the client's blocking ``XREAD`` (``stream()``), from a separate process.

Reported per run: throughput (output tokens/s), TTFT and inter-token latency p50/p99 (measured
where the tokens arrive), the Redis overhead (redis minus inproc) and, for the daemon, token
events written per second. JSON goes to ``bench/results/serve.json`` (``serve-small.json`` for
``--model-size small``).

    python bench/serve.py --quick            # ~1 minute on a laptop CPU
    python bench/serve.py --model-size small # a model whose steps are mostly matrix multiplies
    python bench/serve.py --model PATH --rates inf,5,20 --num-requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

from helix_daemon.client import AsyncHelixClient  # noqa: E402
from helix_daemon.wire import protocol as p  # noqa: E402

# --- workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One request of the workload and when (seconds after the start) it arrives."""

    index: int
    arrival_s: float
    body: dict[str, Any]

    @property
    def max_tokens(self) -> int:
        return int(self.body["max_tokens"])


def make_workload(n: int, rate: float, vocab: int, seed: int = 0) -> list[Job]:
    """Mixed prompts (8-96 tokens) and outputs (8-64 tokens), half greedy, half sampled.

    ``ignore_eos`` keeps every output at ``max_tokens`` so both paths do identical work.
    """
    rng = random.Random(seed)
    t = 0.0
    jobs = []
    for i in range(n):
        if math.isfinite(rate):
            t += rng.expovariate(rate)
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(8, 96))]
        body: dict[str, Any] = {"prompt_token_ids": prompt, "max_tokens": rng.randint(8, 64),
                                "ignore_eos": True}
        if i % 2:
            body.update(temperature=0.8, top_p=0.95, seed=i)
        else:
            body["temperature"] = 0.0
        jobs.append(Job(i, t if math.isfinite(rate) else 0.0, body))
    return jobs


# --- measurements --------------------------------------------------------------------------


@dataclass
class Trace:
    """Arrival times of one request's tokens, as seen by whoever consumes them."""

    submitted: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in chunk)
    finished: float | None = None


def summarize(traces: list[Trace], start: float, events_written: int = 0) -> dict[str, float]:
    ttft = [t.chunks[0][0] - t.submitted for t in traces if t.chunks]
    itl: list[float] = []
    for trace in traces:
        for (prev, _), (now, n) in zip(trace.chunks, trace.chunks[1:]):
            # A chunk of n tokens (coalesced or speculative) counts as n gaps of equal size.
            itl.extend([(now - prev) / n] * n)
    end = max(t.finished or start for t in traces)
    tokens = sum(n for t in traces for _, n in t.chunks)
    wall = end - start
    return {
        "requests": len(traces), "output_tokens": tokens, "wall_s": round(wall, 4),
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
        "itl_p50_ms": _ms(_pct(itl, 50)), "itl_p99_ms": _ms(_pct(itl, 99)),
        "token_events": events_written,
        "token_events_per_s": round(events_written / wall, 1) if wall > 0 else 0.0,
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _sleep_until(t0: float, offset: float) -> None:
    delay = t0 + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


# --- in-process path -----------------------------------------------------------------------


async def run_inproc(engine: Any, jobs: list[Job]) -> dict[str, float]:
    """Feed the jobs to the daemon's engine thread directly; no Redis anywhere."""
    from helix_daemon.engine_host.messages import AddCommand, StepResult
    from helix_daemon.engine_host.thread import EngineThread

    traces = {f"j{job.index}": Trace() for job in jobs}
    all_done = asyncio.Event()
    remaining = len(jobs)

    def deliver(result: StepResult) -> None:
        nonlocal remaining
        now = time.perf_counter()
        if result.fatal is not None or result.rejected:
            raise RuntimeError(f"engine failed: {result.fatal or result.rejected}")
        for out in result.outputs:
            trace = traces[out.request_id]
            if out.new_token_ids:
                trace.chunks.append((now, len(out.new_token_ids)))
            if out.finished:
                trace.finished = now
                remaining -= 1
        if remaining == 0:
            all_done.set()

    worker = EngineThread.on_loop(engine, asyncio.get_running_loop(), deliver)
    worker.start()
    t0 = time.perf_counter()
    try:
        for job in jobs:
            await _sleep_until(t0, job.arrival_s)
            body = p.RequestBody(**job.body)
            traces[f"j{job.index}"].submitted = time.perf_counter()
            worker.add(AddCommand(f"j{job.index}", list(body.prompt_token_ids or []),
                                  p.to_request_params(body)))
        await all_done.wait()
    finally:
        worker.stop()
    return summarize(list(traces.values()), t0)


# --- Redis path ----------------------------------------------------------------------------


def daemon_template(engine: Any, url: str, engine_process: bool,
                    torch_threads: int | None) -> Any:
    """The daemon's settings: the in-process engine's model, pool and batch, on ``url``."""
    from helix_daemon.config import DaemonConfig

    c = engine.config
    return DaemonConfig(model=c.model, draft=c.draft, device=c.device, redis_url=url,
                        max_num_seqs=c.max_num_seqs, kv_cache_memory=str(KV_CACHE_BYTES),
                        torch_threads=torch_threads, engine_process=engine_process)


async def run_redis(engine: Any, jobs: list[Job], template: Any, prefix: str
                    ) -> dict[str, float]:
    """Same jobs through the queue: client XADD -> daemon -> out streams -> XREAD.

    The client (producers and reader) runs in its own process, as real clients do: in this
    process it would compete with the engine thread for the GIL and bill that to Redis. The
    daemon runs the engine in its engine process (loaded from the same folder) or, with
    ``template.engine_process`` off, the in-process path's engine in a thread.
    """
    from helix_daemon.server.daemon import Daemon
    from helix_daemon.server.run import redis_client, run_in_background

    config = dataclasses.replace(template, key_prefix=prefix,
                                 daemon_id=f"bench-{uuid.uuid4().hex[:6]}")
    url = config.redis_url
    daemon_conn = redis_client(url)
    daemon = Daemon(config, None if config.engine_process else engine, daemon_conn)
    try:
        served = await run_in_background(daemon)
    except RuntimeError:
        await daemon_conn.aclose()
        raise
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=client_process, args=(jobs, url, prefix, theirs), daemon=True)
    proc.start()
    theirs.close()  # so recv() raises EOFError instead of hanging if the client process dies
    try:
        summary: dict[str, float] = await asyncio.to_thread(ours.recv)
    finally:
        proc.join(timeout=30)
        daemon.request_stop()
        await served
        await daemon_conn.aclose()
    return summary


def client_process(jobs: list[Job], url: str, prefix: str, conn: Any) -> None:
    """Entry point of the client process: run the workload, send back its summary."""
    conn.send(asyncio.run(drive_client(jobs, url, prefix)))
    conn.close()


async def drive_client(jobs: list[Job], url: str, prefix: str) -> dict[str, float]:
    """Each request: ``submit`` then follow its stream with the blocking-XREAD client."""
    client = AsyncHelixClient.from_url(url, prefix=prefix)
    traces = [Trace() for _ in jobs]
    counts = [0]
    waits: list[float] = []  # daemon-side: enqueue -> claim
    daemon_ttfts: list[float] = []  # daemon-side: claim -> first token taken from the engine

    async def one(trace: Trace, body: dict[str, Any]) -> None:
        trace.submitted = time.perf_counter()
        rid = await client.submit(**body)
        async for event in client.stream(rid, timeout_s=600):
            now = time.perf_counter()
            if isinstance(event, p.TokenEvent):
                counts[0] += 1
                if event.ids:
                    trace.chunks.append((now, len(event.ids)))
            elif isinstance(event, p.DoneEvent):
                trace.finished = now
                waits.append(event.timings.queue_wait_s)
                daemon_ttfts.append(event.timings.ttft_s or 0.0)
            else:
                raise RuntimeError(f"request failed: {event}")

    try:
        # Open the connections before the clock starts, as a long-lived client would have: one
        # per concurrent submit (each new connection also costs redis-py a CLIENT SETINFO).
        await asyncio.gather(*(client.redis.ping() for _ in range(min(len(jobs), 256))))
        # A daemon that has served before: its engine's first forwards are not measured.
        warm = [await client.submit(**{**job.body, "max_tokens": 2}) for job in jobs[:4]]
        await asyncio.gather(*(client.result(rid, timeout_s=600) for rid in warm))
        t0, cpu0 = time.perf_counter(), time.process_time()
        tasks = []
        for job, trace in zip(jobs, traces):
            await _sleep_until(t0, job.arrival_s)
            tasks.append(asyncio.create_task(one(trace, job.body)))
        await asyncio.gather(*tasks)
    finally:
        await client.aclose()
    summary = summarize(traces, t0, counts[0])
    # CPU the client took from the machine the engine runs on (reported, not subtracted)
    summary["client_cpu_s"] = round(time.process_time() - cpu0, 3)
    summary["queue_wait_p50_ms"] = _ms(_pct(waits, 50))
    summary["daemon_ttft_p50_ms"] = _ms(_pct(daemon_ttfts, 50))
    return summary


# --- write capacity ------------------------------------------------------------------------


async def write_capacity(url: str, num_requests: int = 64, num_steps: int = 200) -> dict[str, Any]:
    """Token events per second the daemon's write path sustains, with no model in the way.

    ``num_requests`` claimed requests each get one single-token event per step, written the
    way the daemon's flush loop writes a step: every fenced append in one script call
    (``Store.append_many``, the same Lua script). The engine in the serving runs above makes
    far fewer tokens per second than this, so this is what bounds a daemon on faster hardware.
    """
    from helix_daemon.wire.store import Append, Store

    prefix = f"helixbench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    store = Store(client, prefix=prefix, queue="capacity", daemon_id="writer", lease_ms=60_000)
    ttl_ms = 600_000
    try:
        claims = [await store.claim(f"w{i}", f"{i + 1}-0", now_ms=1, created_ms=1,
                                    max_attempts=3, result_ttl_ms=ttl_ms)
                  for i in range(num_requests)]
        started = time.perf_counter()
        for step in range(num_steps):
            ops = [Append(f"w{i}", "writer", p.TokenEvent(seq=step, att=c.epoch, off=step,
                                                          text="x", ids=[7]), step, step + 1,
                          ttl_ms)
                   for i, c in enumerate(claims)]
            statuses = await store.append_many(ops, now_ms=2)
            if any(status != "ok" for status in statuses):
                raise RuntimeError(f"write refused: {set(statuses)}")
        seconds = time.perf_counter() - started
    finally:
        await client.aclose()
        await _delete_prefix(url, prefix)
    events = num_requests * num_steps
    return {"requests": num_requests, "steps": num_steps, "events": events,
            "seconds": round(seconds, 3), "token_events_per_s": round(events / seconds, 1)}


# --- driver --------------------------------------------------------------------------------


# Built-in random Llamas: "tiny" is Python-bound (Redis is the largest share of its time it can
# be), "small" spends most of a step in matrix multiplies, as real models do.
KV_CACHE_BYTES = 256 << 20
MODEL_SIZES = {"tiny": {"hidden_size": 128, "num_layers": 2},
               "small": {"hidden_size": 512, "num_layers": 8}}


def load_engine(model: str | None, draft: str, max_num_seqs: int, workdir: Path,
                size: str = "tiny") -> Any:
    from helix_daemon.engine.config import EngineConfig
    from helix_daemon.engine.engine import Engine

    if model is None:
        from helix_daemon.testing.tiny_models import build_tiny_model

        model = str(build_tiny_model(workdir / f"{size}-llama", **MODEL_SIZES[size]))
    return Engine.from_config(EngineConfig(model=model, draft=draft, device="auto",
                                           max_num_seqs=max_num_seqs,
                                           kv_cache_memory=KV_CACHE_BYTES))


async def bench(args: argparse.Namespace, engine: Any, url: str) -> list[dict[str, Any]]:
    vocab = len(engine.tokenizer)
    template = daemon_template(engine, url, args.engine == "process", args.torch_threads)
    # Warm-up: first forwards allocate and compile kernels; keep them out of the numbers.
    await run_inproc(engine, make_workload(4, math.inf, vocab, seed=99))
    rows = []
    for rate in args.rates:
        jobs = make_workload(args.num_requests, rate, vocab, seed=args.seed)
        inproc, via_redis = [], []
        for rep in range(args.repeats):
            # Alternate the order so slow drift of a shared machine hits both paths alike.
            for path in (("inproc", "redis") if rep % 2 == 0 else ("redis", "inproc")):
                if path == "inproc":
                    inproc.append(await run_inproc(engine, jobs))
                else:
                    via_redis.append(await _run_redis_clean(engine, jobs, template))
        row = {"rate": "inf" if math.isinf(rate) else rate, "inproc": _median(inproc),
               "redis": _median(via_redis), "repeats": {"inproc": inproc, "redis": via_redis},
               "load_avg_1m": _load_avg()}
        row.update(overhead(row["inproc"], row["redis"]))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


async def _run_redis_clean(engine: Any, jobs: list[Job], template: Any) -> dict[str, float]:
    prefix = f"helixbench-{uuid.uuid4().hex[:8]}"
    try:
        return await run_redis(engine, jobs, template, prefix)
    finally:
        await _delete_prefix(template.redis_url, prefix)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric median over repeats (each metric on its own: robust to one noisy run)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def overhead(inproc: dict[str, float], via_redis: dict[str, float]) -> dict[str, float]:
    ratio = via_redis["throughput_tok_s"] / inproc["throughput_tok_s"] \
        if inproc["throughput_tok_s"] else float("nan")
    return {"ttft_p50_overhead_ms": round(via_redis["ttft_p50_ms"] - inproc["ttft_p50_ms"], 3),
            "itl_p50_overhead_ms": round(via_redis["itl_p50_ms"] - inproc["itl_p50_ms"], 3),
            "throughput_ratio": round(ratio, 4)}


_HEADER = (f"{'rate':>6} {'path':>6} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'ITL p50':>8} {'ITL p99':>8} {'events/s':>9}")


def format_row(row: dict[str, Any]) -> str:
    lines = []
    for path in ("inproc", "redis"):
        r = row[path]
        events = f"{r['token_events_per_s']:>9.0f}" if path == "redis" else f"{'-':>9}"
        lines.append(f"{row['rate']!s:>6} {path:>6} {r['throughput_tok_s']:>9.1f} "
                     f"{r['ttft_p50_ms']:>9.2f} {r['ttft_p99_ms']:>9.2f} {r['itl_p50_ms']:>8.2f} "
                     f"{r['itl_p99_ms']:>8.2f} {events}")
    lines.append(f"{'':>6} {'cost':>6} x{row['throughput_ratio']:<8.3f} "
                 f"{row['ttft_p50_overhead_ms']:>+9.2f} {'':>9} "
                 f"{row['itl_p50_overhead_ms']:>+8.2f}")
    return "\n".join(lines)


async def _delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i:i + 500])
    finally:
        await client.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build a random Llama)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                        help="size of the built-in random Llama when --model is not given")
    parser.add_argument("--draft", default="none", help="none | ngram | draft model folder")
    parser.add_argument("--redis-url", default="auto", help="URL, 'auto' or 'embedded'")
    parser.add_argument("--rates", default=None,
                        help="arrival rates in requests/s, comma-separated; inf = all at once")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch kernel threads for both paths (the daemon's --torch-threads);"
                             " default: 1 for the tiny model, else one fewer than the cores")
    parser.add_argument("--engine", choices=("process", "thread"), default="process",
                        help="where the daemon runs its engine (the daemon's default: process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per path and rate; medians are reported (default 3, quick 2)")
    parser.add_argument("--quick", action="store_true", help="small run (CI / laptops)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/serve.json, serve-quick.json)")
    args = parser.parse_args(argv)
    default_rates = "inf,20" if args.quick else "inf,10,25,50"
    args.rates = [float(r) for r in (args.rates or default_rates).split(",")]
    if args.torch_threads is None and args.model is None and args.model_size == "tiny":
        # A 2-layer, 128-wide model is Python-bound: a second kernel thread only adds OpenMP
        # overhead (in-process burst: 6884 tok/s on 1 thread, 5370 on 2) and takes the core
        # that the event loop, Redis and the client need.
        args.torch_threads = 1
    elif args.torch_threads is None:
        # The daemon's advice for a small box: leave a core to the event loop and Redis (here
        # also to the client process). Both paths run with the same threads.
        args.torch_threads = max(1, (os.cpu_count() or 2) - 1)
    args.num_requests = args.num_requests or (24 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    # a quick smoke run must not overwrite the figures of a full run, nor one size another's
    stem = "serve" if args.model or args.model_size == "tiny" else f"serve-{args.model_size}"
    args.out = args.out or ROOT / "bench" / "results" / (
        f"{stem}-quick.json" if args.quick else f"{stem}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    from helix_daemon.logs import configure_logging
    from helix_daemon.wire.embedded import resolve_redis_url

    args = parse_args(argv)
    configure_logging(level="WARNING")  # per-request log lines would distort the timings
    url, close = resolve_redis_url(args.redis_url)
    try:
        with tempfile.TemporaryDirectory(prefix="helix-bench-") as tmp:
            if args.torch_threads is not None:
                import torch

                torch.set_num_threads(args.torch_threads)
            engine = load_engine(args.model, args.draft, args.max_num_seqs, Path(tmp),
                                 args.model_size)
            print(f"Redis {url}; {args.num_requests} requests per run, median of {args.repeats}"
                  f" runs; torch threads: {_threads()}\n{_HEADER}", flush=True)
            rows = asyncio.run(bench(args, engine, url))
            capacity = asyncio.run(write_capacity(url))
            print(f"write path alone: {capacity['token_events_per_s']:.0f} token events/s "
                  f"({capacity['requests']} requests x {capacity['steps']} steps, one script "
                  "call per step)", flush=True)
    finally:
        close()
    report = {"config": {k: str(v) for k, v in vars(args).items()},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "torch_threads": _threads()},
              "runs": rows, "write_capacity": capacity}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"wrote {args.out}")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return asdict(value)


if __name__ == "__main__":
    sys.exit(main())
