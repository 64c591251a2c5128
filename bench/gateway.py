"""Gateway benchmark: the same workload through the OpenAI-compatible gateway and through the
Redis client, in the same run, against one daemon.

* ``redis``: ``AsyncHelixClient.submit`` + ``stream`` (what bench/serve.py calls the Redis path);
* ``gateway``: ``AsyncOpenAI().completions.create(stream=True)`` against ``helix gateway`` (its
  own process), which does the same submit and stream on the client's behalf.

Both clients run in this process, one after the other (alternating order over repeats); the
daemon (``python -m helix_daemon.daemon``, engine in its own process) and the gateway are child
processes. Reported: throughput (output tokens/s), TTFT p50/p99 (submit to the first non-empty
text, the same event on both paths) and what the gateway adds. A second phase opens ``--streams``
(default 1,000) streams at once on the one gateway process and counts errors.

    python bench/gateway.py --quick
    python bench/gateway.py --num-requests 128 --rates inf,20 --streams 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
import redis  # noqa: E402

from bench.serve import MODEL_SIZES, Job, Trace, _ms, _pct, _sleep_until, make_workload  # noqa: E402
from helix_daemon.client import AsyncHelixClient  # noqa: E402
from helix_daemon.wire import protocol as p  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def start_daemon(model: str, url: str, prefix: str, log: Path, max_num_seqs: int
                 ) -> subprocess.Popen[bytes]:
    env = _env() | {"HELIX_MODEL": model, "HELIX_REDIS_URL": url, "HELIX_KEY_PREFIX": prefix,
                    "HELIX_DEVICE": "cpu", "HELIX_TORCH_THREADS": "1",
                    "HELIX_MAX_NUM_SEQS": str(max_num_seqs), "HELIX_LOG_JSON": "true",
                    "HELIX_KV_CACHE_MEMORY": str(256 << 20)}
    return subprocess.Popen([sys.executable, "-m", "helix_daemon.daemon"], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def start_gateway(url: str, prefix: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    code = ("import sys; from helix_daemon.cli.main import main; "
            f"sys.exit(main(['gateway', '--redis-url', {url!r}, '--prefix', {prefix!r}, "
            f"'--port', '{port}']))")
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def wait_ready(url: str, prefix: str, gateway: str, timeout_s: float = 120) -> None:
    """Until the daemon's heartbeat exists and the gateway answers /health with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{gateway}/health", timeout=2).json()
            if health.get("daemons", 0) >= 1:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError("daemon or gateway did not come up (see the logs in the work dir)")


# --- the two paths --------------------------------------------------------------------------


def summarize(traces: list[Trace], start: float, tokens: int) -> dict[str, float]:
    ttft = [t.chunks[0][0] - t.submitted for t in traces if t.chunks]
    wall = max(t.finished or start for t in traces) - start
    return {"requests": len(traces), "output_tokens": tokens, "wall_s": round(wall, 4),
            "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99))}


async def run_redis(jobs: list[Job], client: AsyncHelixClient) -> dict[str, float]:
    traces = [Trace() for _ in jobs]
    tokens = [0]

    async def one(trace: Trace, body: dict[str, Any]) -> None:
        trace.submitted = time.perf_counter()
        rid = await client.submit(**body)
        async for event in client.stream(rid, timeout_s=600):
            if isinstance(event, p.TokenEvent) and event.text and not trace.chunks:
                trace.chunks.append((time.perf_counter(), len(event.ids)))
            elif isinstance(event, p.DoneEvent):
                trace.finished = time.perf_counter()
                tokens[0] += event.usage.completion_tokens
            elif not isinstance(event, p.TokenEvent):
                raise RuntimeError(f"request failed: {event}")

    return await _drive(jobs, traces, one, tokens)


async def run_gateway(jobs: list[Job], client: openai.AsyncOpenAI) -> dict[str, float]:
    traces = [Trace() for _ in jobs]
    tokens = [0]

    async def one(trace: Trace, body: dict[str, Any]) -> None:
        trace.submitted = time.perf_counter()
        stream = await client.completions.create(**_openai_params(body))
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not trace.chunks:
                trace.chunks.append((time.perf_counter(), 1))
            if chunk.usage is not None:
                tokens[0] += chunk.usage.completion_tokens
        trace.finished = time.perf_counter()

    return await _drive(jobs, traces, one, tokens)


def _openai_params(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"model": "default", "prompt": body["prompt_token_ids"],
                              "max_tokens": body["max_tokens"], "stream": True,
                              "stream_options": {"include_usage": True},
                              "temperature": body["temperature"],
                              "extra_body": {"ignore_eos": body["ignore_eos"]}}
    for name in ("top_p", "seed"):
        if name in body:
            params[name] = body[name]
    return params


GATEWAY_PID: int | None = None  # set by main(): the gateway's CPU is reported per run


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _drive(jobs: list[Job], traces: list[Trace], one: Any, tokens: list[int]
                 ) -> dict[str, float]:
    t0, cpu0, gw0 = time.perf_counter(), time.process_time(), _cpu_s(GATEWAY_PID)
    tasks = []
    for job, trace in zip(jobs, traces):
        await _sleep_until(t0, job.arrival_s)
        tasks.append(asyncio.create_task(one(trace, job.body)))
    await asyncio.gather(*tasks)
    summary = summarize(traces, t0, tokens[0])
    # CPU of this process (the client) and of the gateway process during the run
    summary["client_cpu_s"] = round(time.process_time() - cpu0, 3)
    summary["gateway_cpu_s"] = round(_cpu_s(GATEWAY_PID) - gw0, 3)
    return summary


async def open_streams(client: openai.AsyncOpenAI, num_streams: int, vocab: int
                       ) -> dict[str, Any]:
    """``num_streams`` streaming requests at once on one gateway: errors, peak in flight."""
    in_flight = [0, 0]  # now, peak
    errors: list[str] = []

    async def one(i: int) -> int:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            stream = await client.completions.create(
                model="default", prompt=[1 + i % (vocab - 1), 2, 3], max_tokens=8, stream=True,
                temperature=0, extra_body={"ignore_eos": True})
            return sum([1 async for chunk in stream if chunk.choices and chunk.choices[0].text])
        except Exception as e:  # counted, not raised: the figure is how many failed
            errors.append(repr(e)[:200])
            return 0
        finally:
            in_flight[0] -= 1

    started = time.perf_counter()
    chunks = await asyncio.gather(*(one(i) for i in range(num_streams)))
    return {"streams": num_streams, "errors": len(errors), "first_errors": errors[:3],
            "peak_in_flight": in_flight[1], "streams_with_text": sum(c > 0 for c in chunks),
            "wall_s": round(time.perf_counter() - started, 2)}


# --- driver ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, gateway_url: str, prefix: str, vocab: int
                ) -> dict[str, Any]:
    helix = AsyncHelixClient.from_url(args.redis_url, prefix=prefix)
    # openai's own default allows 1,000 connections; its Limits class is httpx's or httpx2's
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=args.streams + 100, max_keepalive_connections=args.streams + 100)
    http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=600.0)
    gateway = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused",
                                 http_client=http, max_retries=0)
    rows = []
    try:
        warm = make_workload(8, math.inf, vocab, seed=99)
        await run_redis(warm, helix)
        await run_gateway(warm, gateway)
        for rate in args.rates:
            jobs = make_workload(args.num_requests, rate, vocab, seed=args.seed)
            runs: dict[str, list[dict[str, float]]] = {"redis": [], "gateway": []}
            for rep in range(args.repeats):
                order = ("redis", "gateway") if rep % 2 == 0 else ("gateway", "redis")
                for path in order:
                    run = run_redis(jobs, helix) if path == "redis" else \
                        run_gateway(jobs, gateway)
                    runs[path].append(await run)
            row = {"rate": "inf" if math.isinf(rate) else rate, "runs": runs,
                   **{path: _median(r) for path, r in runs.items()}}
            row["ttft_p50_added_ms"] = round(row["gateway"]["ttft_p50_ms"]
                                             - row["redis"]["ttft_p50_ms"], 3)
            row["throughput_ratio"] = round(row["gateway"]["throughput_tok_s"]
                                            / row["redis"]["throughput_tok_s"], 4)
            print(format_row(row), flush=True)
            rows.append(row)
        streams = await open_streams(gateway, args.streams, vocab) if args.streams else None
        if streams:
            print(f"{streams['streams']} streams at once on one gateway: {streams['errors']} "
                  f"errors, peak {streams['peak_in_flight']} in flight, "
                  f"{streams['streams_with_text']} with text, {streams['wall_s']} s", flush=True)
    finally:
        await gateway.close()
        await helix.aclose()
    return {"rows": rows, "open_streams": streams}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


HEADER = (f"{'rate':>6} {'path':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'client CPU':>10} {'gateway CPU':>11}")


def format_row(row: dict[str, Any]) -> str:
    lines = [f"{row['rate']!s:>6} {path:>8} {row[path]['throughput_tok_s']:>9.1f} "
             f"{row[path]['ttft_p50_ms']:>9.2f} {row[path]['ttft_p99_ms']:>9.2f} "
             f"{row[path]['client_cpu_s']:>9.2f}s {row[path]['gateway_cpu_s']:>10.2f}s"
             for path in ("redis", "gateway")]
    lines.append(f"{'':>6} {'added':>8} x{row['throughput_ratio']:<8.3f} "
                 f"{row['ttft_p50_added_ms']:>+9.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build a random tiny Llama)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rates", default=None, help="requests/s, comma-separated; inf = burst")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--streams", type=int, default=1000,
                        help="concurrent streams of the second phase (0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in (args.rates or ("20" if args.quick else "inf,10,25")
                                     ).split(",")]
    args.num_requests = args.num_requests or (32 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.out = args.out or ROOT / "bench" / "results" / (
        "gateway-quick.json" if args.quick else "gateway.json")
    return args


def main(argv: list[str] | None = None) -> int:
    from helix_daemon.testing.tiny_models import build_tiny_model

    args = parse_args(argv)
    prefix = f"helixbench-gw-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="helix-bench-gw-") as tmp:
        work = Path(tmp)
        model = args.model or str(build_tiny_model(work / "tiny", **MODEL_SIZES["tiny"]))
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(model))
        daemon = start_daemon(model, args.redis_url, prefix, work / "daemon.log",
                              args.max_num_seqs)
        gateway = start_gateway(args.redis_url, prefix, port, work / "gateway.log")
        global GATEWAY_PID
        GATEWAY_PID = gateway.pid
        try:
            wait_ready(args.redis_url, prefix, f"http://127.0.0.1:{port}")
            print(f"{args.num_requests} requests per run, median of {args.repeats}; daemon "
                  f"max_num_seqs {args.max_num_seqs}\n{HEADER}", flush=True)
            result = asyncio.run(bench(args, f"http://127.0.0.1:{port}", prefix, vocab))
        finally:
            for proc in (gateway, daemon):
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            _delete_prefix(args.redis_url, prefix)
    report = {"config": {k: str(v) for k, v in vars(args).items()},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count()}, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()


if __name__ == "__main__":
    sys.exit(main())
