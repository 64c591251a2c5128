"""The ``helix`` command line: serve, submit, stream, cancel, status, batch and demo.

Every client command is a thin layer over ``helix_daemon.client`` (protocol v1, docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from helix_daemon.client import AsyncHelixClient, HelixClient, RequestResult
from helix_daemon.config import CPU_LINEAR_CHOICES
from helix_daemon.embedded import resolve_redis_url
from helix_daemon.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE, TokenEvent

BATCH_NAMESPACE = uuid.UUID("5b0f3c1e-6d8a-4f4e-9a51-3c2f0e7b8d11")  # uuid5 namespace of batch ids

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> str:
    """Validate ``--kv-cache-memory``: ``auto``, a fraction in (0, 1] or a size like ``2GiB``.

    Returns the normalised form the daemon config takes: ``auto``, the fraction, or bytes.
    """
    value = text.strip().lower()
    if value == "auto":
        return value
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if match is None or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size or fraction: {text!r} (try 2GiB or 0.5)")
    number = float(match.group(1))
    if match.group(2) == "" and 0 < number <= 1:
        return repr(number)
    size = int(number * _UNITS[match.group(2)])
    if size <= 1:
        raise argparse.ArgumentTypeError(f"KV cache size must be positive: {text!r}")
    return str(size)


# --- parser ----------------------------------------------------------------------------------


SHARED_DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _common(redis_url: str = SHARED_DEFAULT_URL) -> argparse.ArgumentParser:
    # A fresh parent per subcommand: argparse shares parents' actions, so one subcommand's
    # defaults would otherwise leak into the others.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=redis_url,
                        help="Redis URL; 'embedded' starts a private one, 'auto' reuses "
                             "127.0.0.1:6379 or starts one (serve, demo)")
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default: helix)")
    common.add_argument("--queue", default=DEFAULT_QUEUE, help="queue name (default: default)")
    common.add_argument("--log-level", default="WARNING")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="helix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub.add_parser("serve", parents=[common], help="run a daemon"))
    _add_submit(sub.add_parser("submit", parents=[common], help="enqueue one request"))
    stream = sub.add_parser("stream", parents=[common], help="follow a request's output")
    stream.add_argument("id")
    stream.add_argument("--from-seq", type=int, default=0)
    stream.add_argument("--json", action="store_true", help="one JSON event per line")
    stream.add_argument("--timeout-s", type=float, default=None)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel requests")
    cancel.add_argument("ids", nargs="+")
    status = sub.add_parser("status", parents=[common], help="daemons, queue depth, KV use")
    status.add_argument("--json", action="store_true")
    _add_batch(sub.add_parser("batch", parents=[common], help="run a JSONL file of requests"))
    _add_demo(sub.add_parser("demo", parents=[_common("auto")],
                             help="end-to-end demo on tiny models"))
    return parser


def _add_serve(p: argparse.ArgumentParser) -> None:
    # defaults are None: an unset flag leaves HELIX_<NAME> (or the built-in default) in force
    p.add_argument("--model", help="folder or hub id of the target model (or HELIX_MODEL)")
    p.add_argument("--draft", help="none (default) | ngram | folder or hub id of a draft")
    p.add_argument("--device", help="auto (default) | cuda | cuda:N | mps | directml | cpu")
    p.add_argument("--dtype", help="auto (default) | float32 | float16 | bfloat16 | float64")
    p.add_argument("--kv-cache-memory", type=parse_memory,
                   help="bytes (2GiB) or a fraction of free device memory (0.5); default auto")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 0 = off)")
    p.add_argument("--daemon-id", help="stable consumer name (default host:queue:0)")
    p.add_argument("--max-num-seqs", type=int, help="most sequences in a step (default 64)")
    p.add_argument("--max-waiting", type=int,
                   help="requests held beyond --max-num-seqs, ready for the next free place "
                        "(default 16; 0 = hold no more than run)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="most tokens in a step (default 1024)")
    p.add_argument("--num-speculative-tokens", type=int,
                   help="most draft tokens per sequence and step (default 4)")
    p.add_argument("--torch-threads", type=int,
                   help="CPU threads for torch's kernels (default: torch's, one per core)")
    p.add_argument("--cpu-linear", choices=CPU_LINEAR_CHOICES,
                   help="CPU linear layers: auto (default: oneDNN on packed weights where "
                        "measured faster at load) | onednn | blas (F.linear)")
    p.add_argument("--engine-thread", dest="engine_process", action="store_const", const=False,
                   help="run the engine in a thread of the daemon instead of its own process")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-ids)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    p.add_argument("--id", dest="request_id", default=None, help="request id (idempotency key)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--priority", type=int)
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--num-speculative-tokens", type=int)
    p.add_argument("--result-ttl-s", type=int)
    p.add_argument("--body", help="extra body fields as a JSON object")
    p.add_argument("--stream", action="store_true", help="follow the output after submitting")


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="JSONL: one request body per line (+ optional id)")
    p.add_argument("output", type=Path, help="JSONL results (appended; finished ids skipped)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--timeout-s", type=float, default=None, help="per-request wait limit")
    p.add_argument("--no-progress", action="store_true")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--draft", default="ngram", help="none | ngram | model (a tiny draft model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "helix" / "demo")
    p.add_argument("--kv-cache-memory", type=parse_memory, default="4MiB",
                   help="KV budget of the demo daemon (small, so its use is visible)")
    p.add_argument("--subprocess", action="store_true", help="run the daemon as `helix serve`")
    p.add_argument("--no-progress", action="store_true")


# --- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from helix_daemon.logs import configure_logging

    configure_logging(level=args.log_level if args.command != "serve" else "INFO")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": cmd_serve, "submit": cmd_submit, "stream": cmd_stream, "cancel": cmd_cancel,
        "status": cmd_status, "batch": cmd_batch, "demo": cmd_demo,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TimeoutError, ConnectionError, OSError) as e:
        print(f"helix {args.command}: {e}", file=sys.stderr)
        return 2


# --- serve -----------------------------------------------------------------------------------


def daemon_config(args: argparse.Namespace, redis_url: str) -> Any:
    """``DaemonConfig`` from HELIX_* variables, overridden by the flags given.

    Serve flags default to None so an unset flag leaves its HELIX_* variable in force; the
    shared flags (Redis URL, queue, prefix) override only when they differ from their default.
    """
    from helix_daemon.config import DaemonConfig

    given = {
        "model": args.model, "draft": args.draft, "device": args.device, "dtype": args.dtype,
        "kv_cache_memory": args.kv_cache_memory, "metrics_port": args.metrics_port,
        "daemon_id": args.daemon_id, "max_num_seqs": args.max_num_seqs,
        "max_waiting": args.max_waiting,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_speculative_tokens": args.num_speculative_tokens,
        "torch_threads": args.torch_threads, "engine_process": args.engine_process,
        "cpu_linear": args.cpu_linear,
    }
    overrides = {name: value for name, value in given.items() if value is not None}
    shared = {"queue": (args.queue, DEFAULT_QUEUE), "key_prefix": (args.prefix, DEFAULT_PREFIX),
              "redis_url": (redis_url, SHARED_DEFAULT_URL)}
    overrides |= {name: value for name, (value, default) in shared.items() if value != default}
    config = DaemonConfig.from_env(**overrides)
    if not config.model:
        raise SystemExit("helix serve: give --model or set HELIX_MODEL")
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from helix_daemon.daemon import serve

    url, close = resolve_redis_url(args.redis_url)
    try:
        if url != args.redis_url:
            print(f"helix serve: Redis at {url}", file=sys.stderr, flush=True)
        return serve(daemon_config(args, url))
    finally:
        close()


# --- submit / stream / cancel / status --------------------------------------------------------


def _client(args: argparse.Namespace) -> HelixClient:
    return HelixClient.from_url(args.redis_url, prefix=args.prefix, queue=args.queue)


def submit_params(args: argparse.Namespace) -> dict[str, Any]:
    """Body fields from the submit flags: only those given, so the daemon defaults apply."""
    params: dict[str, Any] = json.loads(args.body) if args.body else {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                 "ignore_eos", "priority", "timeout_s", "num_speculative_tokens",
                 "result_ttl_s"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.prompt_ids:
        params["prompt_token_ids"] = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    return params


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rid = client.submit(args.prompt, request_id=args.request_id, **submit_params(args))
        print(rid, flush=True)
        if not args.stream:
            return 0
        return _print_stream(client, rid, 0, as_json=False, timeout_s=None)


def cmd_stream(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_stream(client, args.id, args.from_seq, args.json, args.timeout_s)


def _print_stream(client: HelixClient, rid: str, from_seq: int, as_json: bool,
                  timeout_s: float | None, out: TextIO | None = None) -> int:
    """Print text deltas as they arrive (or JSON events); exit 0 only for ``done``."""
    import msgspec

    out = out or sys.stdout  # looked up per call: tests and pipes may replace it
    for event in client.stream(rid, from_seq, timeout_s=timeout_s):
        tag = event.__struct_config__.tag
        if as_json:
            record = {"type": tag, **msgspec.to_builtins(event)}
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
        elif tag == "token":
            print(event.text, end="", file=out, flush=True)
        else:
            print(file=out)
            print(_terminal_line(event), file=sys.stderr, flush=True)
        if tag != "token":
            return 0 if tag == "done" else 1
    return 1  # unreachable: stream() ends only after a terminal event or by raising


def _terminal_line(event: Any) -> str:
    tag = event.__struct_config__.tag
    if tag == "done":
        t = event.timings
        return (f"[done: {event.finish_reason}, {event.usage.completion_tokens} tokens, "
                f"ttft {t.ttft_s or 0:.3f}s, {t.tokens_per_s:.1f} tok/s, attempts {t.attempts}]")
    if tag == "error":
        return f"[error {event.code}: {event.message}]"
    return f"[cancelled: {event.reason}]"


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for rid in args.ids:
            pending = client.cancel(rid)
            print(f"{rid}\t{'cancel requested' if pending else 'already finished'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        import msgspec

        print(json.dumps(msgspec.to_builtins(status)))
        return 0
    print(format_status(status, now_ms=int(time.time() * 1000)))
    return 0


def format_status(status: Any, now_ms: int) -> str:
    lag = "" if status.lag is None else f", {status.lag} not yet delivered"
    lines = [f"queue {status.queue}: {status.length} entries, {status.pending} pending{lag}", ""]
    header = ("DAEMON", "STATE", "SEEN", "MODEL", "DEVICE", "RUN", "WAIT", "KV USE", "TOK/S",
              "ACCEPT")
    rows = [header]
    for daemon_id, seen_ms, beat in status.daemons:
        age = f"{max(0, now_ms - seen_ms) / 1000:.0f}s ago"
        if beat is None:
            rows.append((daemon_id, "gone", age, "-", "-", "-", "-", "-", "-", "-"))
            continue
        kv = beat.kv_blocks_used / beat.kv_blocks_total if beat.kv_blocks_total else 0.0
        accept = "-" if beat.acceptance_rate is None else f"{beat.acceptance_rate:.2f}"
        rows.append((daemon_id, "alive", age, Path(beat.model).name or beat.model, beat.device,
                     str(beat.running), str(beat.waiting),
                     f"{kv:.0%} ({beat.kv_blocks_used}/{beat.kv_blocks_total})",
                     f"{beat.tokens_per_s:.1f}", accept))
    if len(rows) == 1:
        return "\n".join([*lines, "no daemons registered"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# --- batch -----------------------------------------------------------------------------------


@dataclass
class BatchItem:
    """One line of a batch: its id and body, or why it cannot be submitted."""

    line: int
    request_id: str
    body: dict[str, Any]
    invalid: str | None = None


@dataclass
class BatchReport:
    """What a batch run did, with the client-side timings the demo summarises."""

    total: int = 0
    skipped: int = 0  # already in the output file
    reused: int = 0  # finished in Redis before this run: result copied, nothing enqueued
    results: list[RequestResult] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # submit -> first token event
    e2e_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok)


def read_batch(path: Path) -> list[BatchItem]:
    """Parse a JSONL file; ids default to uuid5(sha256(file), line number) so a re-run of the
    same file maps every line to the same request."""
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    items = []
    for number, raw in enumerate(content.decode("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        default_id = str(uuid.uuid5(BATCH_NAMESPACE, f"{digest}:{number}"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("a line must be a JSON object")
        except ValueError as e:
            items.append(BatchItem(number, default_id, {}, invalid=f"line {number}: {e}"))
            continue
        request_id = str(body.pop("id", None) or default_id)
        items.append(BatchItem(number, request_id, body))
    return items


def finished_ids(path: Path) -> set[str]:
    """Ids already written to an output file (a torn last line is ignored)."""
    if not path.exists():
        return set()
    done = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(json.loads(raw)["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


async def run_batch(client: AsyncHelixClient, items: Sequence[BatchItem], out: TextIO | None,
                    *, concurrency: int = 32, timeout_s: float | None = None,
                    skip: set[str] | None = None, progress: bool = True) -> BatchReport:
    """Submit ``items`` with at most ``concurrency`` in flight; write each result as one JSONL
    line the moment it finishes (so an interrupted run loses nothing it already has)."""
    from tqdm import tqdm

    skip = skip or set()
    todo = [item for item in items if item.request_id not in skip]
    report = BatchReport(total=len(items), skipped=len(items) - len(todo))
    queue: asyncio.Queue[BatchItem] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), disable=not progress or None, unit="req", file=sys.stderr)
    start = time.perf_counter()

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            result = await _run_item(client, item, report, timeout_s)
            report.results.append(result)
            if out is not None:
                out.write(json.dumps({"line": item.line, **result.to_dict()},
                                     ensure_ascii=False) + "\n")
                out.flush()
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        bar.close()
    report.wall_s = time.perf_counter() - start
    return report


async def _run_item(client: AsyncHelixClient, item: BatchItem, report: BatchReport,
                    timeout_s: float | None) -> RequestResult:
    from helix_daemon.client import ResultBuilder
    from scheduler.errors import InvalidRequestError

    if item.invalid is not None:
        return RequestResult(item.request_id, "error", error_code="invalid_request",
                             error_message=item.invalid)
    if (await client.meta(item.request_id)).get("state") == "done":
        report.reused += 1
    start = time.perf_counter()
    try:
        await client.submit(request_id=item.request_id, **item.body)
    except InvalidRequestError as e:
        return RequestResult(item.request_id, "error", error_code="invalid_request",
                             error_message=str(e))
    builder = ResultBuilder(item.request_id)
    async for event in client.stream(item.request_id, timeout_s=timeout_s):
        if isinstance(event, TokenEvent) and event.seq == 0:
            report.ttft_s.append(time.perf_counter() - start)
        result = builder.add(event)
        if result is not None:
            report.e2e_s.append(time.perf_counter() - start)
            return result
    raise RuntimeError("stream ended without a terminal event")


def cmd_batch(args: argparse.Namespace) -> int:
    items = read_batch(args.input)
    skip = finished_ids(args.output)

    async def go() -> BatchReport:
        async with AsyncHelixClient.from_url(args.redis_url, prefix=args.prefix,
                                             queue=args.queue) as client:
            with args.output.open("a", encoding="utf-8") as out:
                return await run_batch(client, items, out, concurrency=args.concurrency,
                                       timeout_s=args.timeout_s, skip=skip,
                                       progress=not args.no_progress)

    report = asyncio.run(go())
    print(f"{report.total} requests: {report.skipped} already in {args.output}, "
          f"{len(report.results)} written ({report.reused} reused from Redis), "
          f"{report.failed} failed, {report.wall_s:.1f}s", file=sys.stderr)
    return 1 if report.failed else 0


# --- demo ------------------------------------------------------------------------------------

_DEMO_PROMPTS = (
    "The quick brown fox", "Once upon a time", "In a paged KV cache, every block",
    "Speculative decoding drafts tokens that", "Redis streams deliver each entry to",
    "def fibonacci(n):", "The capital of France is", "Continuous batching means",
)


def demo_models(cache_dir: Path, draft: str) -> tuple[str, str]:
    """Build (once, cached) the tiny target and, for ``--draft model``, a tiny draft model."""
    from helix_daemon.tiny_models import build_tiny_model

    def cached(name: str, **kwargs: Any) -> str:
        path = cache_dir / name
        if not (path / "config.json").exists():
            # Build beside the final folder and rename: a killed build leaves no half model.
            tmp = cache_dir / f".{name}.{uuid.uuid4().hex[:6]}"
            build_tiny_model(tmp, **kwargs)
            tmp.replace(path)
        return str(path)

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cached("target-llama", seed=0)
    if draft == "model":
        return target, cached("draft-llama", seed=1, num_layers=1)
    return target, draft


def demo_items(n: int, max_tokens: int, seed: int = 0) -> list[BatchItem]:
    """A mixed workload: greedy and sampled requests of varied lengths."""
    import random

    rng = random.Random(seed)
    items = []
    for i in range(n):
        body: dict[str, Any] = {"prompt": _DEMO_PROMPTS[i % len(_DEMO_PROMPTS)],
                                "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens)}
        if i % 2:
            body.update(temperature=0.8, top_p=0.95, seed=i)
        else:
            body["temperature"] = 0.0
        items.append(BatchItem(i + 1, f"demo-{uuid.uuid4().hex[:12]}", body))
    return items


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
        target, draft = demo_models(args.cache_dir, args.draft)
        print(f"models: target {target}, draft {draft}", flush=True)
        return asyncio.run(_demo(args, url, prefix, target, draft))
    finally:
        if prefix != args.prefix:
            _delete_prefix(url, prefix)
        close()


async def _demo(args: argparse.Namespace, url: str, prefix: str, target: str,
                draft: str) -> int:
    from helix_daemon.config import DaemonConfig

    config = DaemonConfig(model=target, draft=draft, device=args.device, redis_url=url,
                          key_prefix=prefix, queue=args.queue,
                          daemon_id=f"demo-{uuid.uuid4().hex[:6]}",
                          kv_cache_memory=args.kv_cache_memory, heartbeat_interval_s=0.5)
    async with AsyncHelixClient.from_url(url, prefix=prefix, queue=args.queue) as client:
        log_path = args.cache_dir / "daemon.log" if args.subprocess else None
        print("waiting for the daemon to load the model...", flush=True)
        stop_daemon, engine_stats = await _start_daemon(config, log_path)
        sampler = _HeartbeatSampler(client, config.daemon_id)
        try:
            await _wait_heartbeat(client, config.daemon_id, timeout_s=120)
            await _show_streams(client, args.max_tokens)
            sampling = asyncio.create_task(sampler.run())
            report = await run_batch(client, demo_items(args.num_requests, args.max_tokens),
                                     None, concurrency=args.concurrency, timeout_s=300,
                                     progress=not args.no_progress)
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
    from helix_daemon.daemon import Daemon, redis_client, run_in_background

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
    import signal

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
    from helix_daemon.protocol import daemon_key

    deadline = time.monotonic() + timeout_s
    while not await client.redis.exists(daemon_key(daemon_id, client.prefix)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon {daemon_id} sent no heartbeat in {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def _show_streams(client: AsyncHelixClient, max_tokens: int) -> None:
    """Stream two requests to the terminal, token by token."""
    for prompt in _DEMO_PROMPTS[:2]:
        rid = await client.submit(prompt, max_tokens=max_tokens, temperature=0.0)
        print(f"\n[{rid[:8]}] {prompt!r} ->", end=" ", flush=True)
        async for event in client.stream(rid, timeout_s=120):
            if isinstance(event, TokenEvent):
                print(repr(event.text)[1:-1], end="", flush=True)
            else:
                print(f"\n  {_terminal_line(event)}", flush=True)
    print(flush=True)


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
        import msgspec

        from helix_daemon.protocol import Heartbeat, daemon_key

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
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    except redis.ConnectionError:
        pass  # the embedded server is already gone: nothing left to clean
    finally:
        client.close()
