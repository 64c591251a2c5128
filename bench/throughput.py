"""Throughput and latency of Helix's continuous-batching engine against Hugging Face baselines.

Every method serves the same seeded workload (mixed prompt lengths and budgets, Poisson arrivals)
with the same model on the same machine, greedy, float32 on CPU: a random-weight Llama with random
prompts, or with ``--model`` a real one (folder or ``.gguf``) with chat prompts rendered by its
template. A request never starts before its arrival time. Run ``python bench/throughput.py
[--quick | --model FILE]``; see bench/README.md for how each column is defined.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.chat_workload import chat_workload
from bench.common import (
    BLOCK_SIZE,
    FULL_MODEL,
    FULL_WORKLOAD,
    QUICK_MODEL,
    QUICK_WORKLOAD,
    REFERENCE_WORKLOAD,
    BenchRequest,
    ModelSpec,
    RequestTrace,
    WorkloadSpec,
    build_model,
    concurrency_report,
    latency_summary,
    load_hf_model,
    make_workload,
    real_model,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("hf_sequential", "hf_static", "hf_continuous", "helix")
BASELINES = METHODS[:3]
# Helix and the batched baselines first: if a long run is cut off, the slow sequential baseline
# (also the greedy reference) is what is missing, and the JSON written so far keeps the rest
RUN_ORDER = ("helix", "hf_continuous", "hf_static", "hf_sequential")


@dataclass(slots=True)
class MethodResult:
    """One method's raw measurements; ``summary`` turns them into the table's columns."""

    name: str
    traces: dict[str, RequestTrace]
    start: float
    end: float
    peak_kv_blocks: float | None  # in 16-token units (contiguous caches: slots / 16)
    kv_waste: float | None  # allocated-but-unused slots / allocated slots, summed over steps
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self, reference: dict[str, list[int]] | None) -> dict[str, Any]:
        num_tokens = sum(len(t.tokens) for t in self.traces.values())
        out = {
            "tokens": num_tokens, "seconds": self.end - self.start,
            "tokens_per_s": num_tokens / (self.end - self.start),
            **latency_summary(self.traces.values()),
            "peak_kv_blocks": self.peak_kv_blocks, "kv_waste": self.kv_waste,
        }
        if reference is not None:
            same = [rid for rid, t in self.traces.items() if t.tokens == reference[rid]]
            out["identical_outputs"] = len(same)
            out["compared_outputs"] = len(self.traces)
        return out | self.notes


def new_traces(requests: Sequence[BenchRequest], start: float) -> dict[str, RequestTrace]:
    return {r.request_id: RequestTrace(start + r.arrival_s) for r in requests}


# -- Hugging Face generate (sequential and static batches) ----------------------------------------


class StepClock(BaseStreamer):
    """Stamps each decoding step's tokens as ``generate`` produces them (one ``put`` per step).

    Each row keeps tokens only up to its own ``max_tokens``: in a static batch the longest
    request sets the step count, and the rows past their budget are not counted.
    """

    def __init__(self, traces: Sequence[RequestTrace], limits: Sequence[int]) -> None:
        self.traces, self.limits = traces, limits
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate hands over the prompt ids first
            self._seen_prompt = True
            return
        now = time.perf_counter()
        tokens = value.reshape(len(self.traces), -1)[:, 0].tolist()
        for token, trace, limit in zip(tokens, self.traces, self.limits):
            if len(trace.tokens) < limit:
                trace.add([token], now)

    def end(self) -> None:
        pass


def left_pad(prompts: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, prompts: Sequence[list[int]], max_new: int,
                streamer: BaseStreamer | None = None) -> None:
    ids, mask = left_pad(prompts)
    # eos_token_id=None (also in the saved config): every row runs its full budget
    model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                   eos_token_id=None, pad_token_id=0, streamer=streamer)


def run_hf_sequential(model: torch.nn.Module, requests: Sequence[BenchRequest]) -> MethodResult:
    """``generate`` one request at a time, in arrival order; DynamicCache holds exactly its KV."""
    start = time.perf_counter()
    traces = new_traces(requests, start)
    for req in sorted(requests, key=lambda r: r.arrival_s):
        wait_until(start + req.arrival_s)
        trace = traces[req.request_id]
        hf_generate(model, [req.prompt_ids], req.max_tokens, StepClock([trace], [req.max_tokens]))
    end = time.perf_counter()
    # one request at a time, grown token by token: the peak is the longest request, no waste
    peak = max(len(r.prompt_ids) + r.max_tokens for r in requests) / BLOCK_SIZE
    return MethodResult("hf_sequential", traces, start, end, peak, 0.0)


def static_kv(batch: Sequence[BenchRequest], width: int, max_new: int) -> tuple[int, int, int]:
    """(allocated, used) slots summed over the batch's steps, and its final allocation.

    A padded batch allocates ``rows * (width + step)`` slots; a row really uses its own prompt
    plus the tokens it still needs (left padding and tokens past its budget are waste).
    """
    allocated = used = 0
    for step in range(1, max_new + 1):
        allocated += len(batch) * (width + step)
        used += sum(len(r.prompt_ids) + min(step, r.max_tokens) for r in batch)
    return allocated, used, len(batch) * (width + max_new)


def run_hf_static(model: torch.nn.Module, requests: Sequence[BenchRequest],
                  batch_size: int) -> MethodResult:
    """Padded batches in arrival order; a batch starts once its last member has arrived."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    start = time.perf_counter()
    traces = new_traces(requests, start)
    allocated = used = peak = 0
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first: first + batch_size]
        wait_until(start + batch[-1].arrival_s)
        max_new = max(r.max_tokens for r in batch)
        clock = StepClock([traces[r.request_id] for r in batch], [r.max_tokens for r in batch])
        hf_generate(model, [r.prompt_ids for r in batch], max_new, clock)
        width = max(len(r.prompt_ids) for r in batch)
        alloc, use, final = static_kv(batch, width, max_new)
        allocated, used, peak = allocated + alloc, used + use, max(peak, final)
    end = time.perf_counter()
    return MethodResult("hf_static", traces, start, end, peak / BLOCK_SIZE, 1 - used / allocated,
                        {"batch_size": batch_size})


# -- Hugging Face continuous batching ----------------------------------------------------------


class PagedKVSampler:
    """Samples HF's paged cache once per step, from inside its generation thread.

    Wraps the batch processor's ``update_batch`` (called once after every forward): at that
    point each active request's ``position_offset`` counts the tokens its blocks hold.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.allocated = self.used = self.peak_blocks = 0
        original = processor.update_batch
        processor.update_batch = lambda: (self._sample(), original())[1]

    def _sample(self) -> None:
        cache, sched = self.processor.cache, self.processor.scheduler
        blocks = sum(len(table) for alloc in cache.cache_allocators.values()
                     for table in alloc.block_table.values())
        self.peak_blocks = max(self.peak_blocks, blocks)
        self.allocated += blocks * BLOCK_SIZE
        self.used += sum(s.position_offset for s in list(sched.active_requests.values()))

    @property
    def waste(self) -> float | None:
        return 1 - self.used / self.allocated if self.allocated else None


def start_hf_manager(model: torch.nn.Module, max_new: int, num_blocks: int,
                     max_batch_tokens: int, max_seqs: int,
                     block_sharing: bool = False) -> tuple[Any, PagedKVSampler]:
    """HF's continuous-batching manager, started; ``block_sharing`` is its prefix cache."""
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1,
                           pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=BLOCK_SIZE, num_blocks=num_blocks,
                                  max_batch_tokens=max_batch_tokens,
                                  max_requests_per_batch=max_seqs,
                                  allow_block_sharing=block_sharing)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.warmup()  # builds the batch processor before the loop starts, so it can be wrapped
    sampler = PagedKVSampler(manager.batch_processor)
    manager.start()
    return manager, sampler


def run_hf_continuous(model: torch.nn.Module, requests: Sequence[BenchRequest], num_blocks: int,
                      max_batch_tokens: int, max_seqs: int) -> MethodResult:
    """``init_continuous_batching`` (what ``generate_batch`` wraps), fed at arrival times.

    ``generate_batch`` itself takes all prompts at once with one ``max_new_tokens``; its manager
    takes per-request budgets, so requests join the running batch as they arrive.
    """
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    # block sharing (HF's prefix cache, on by default) on, as Helix's prefix cache is
    manager, sampler = start_hf_manager(model, max(r.max_tokens for r in requests), num_blocks,
                                        max_batch_tokens, max_seqs, block_sharing=True)
    results: dict[str, Any] = {}
    try:
        start = time.perf_counter()
        while len(results) < len(requests):
            while pending and start + pending[0].arrival_s <= time.perf_counter():
                req = pending.popleft()
                manager.add_request(req.prompt_ids, request_id=req.request_id,
                                     max_new_tokens=req.max_tokens, record_timestamps=True,
                                     eos_token_id=-1)
            next_at = start + pending[0].arrival_s if pending else time.perf_counter() + 0.5
            out = manager.get_result(timeout=max(1e-3, min(0.5, next_at - time.perf_counter())))
            if out is not None and out.is_finished():
                results[out.request_id] = out
            elif out is None and not manager.is_running():
                raise RuntimeError("HF continuous batching loop died")
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    traces = new_traces(requests, start)
    for rid, out in results.items():
        traces[rid].tokens = list(out.generated_tokens)
        traces[rid].token_times = list(out.timestamps)
    end = max(t.token_times[-1] for t in traces.values())
    return MethodResult("hf_continuous", traces, start, end, sampler.peak_blocks, sampler.waste,
                        {"attn_implementation": model.config._attn_implementation})


# -- Helix ---------------------------------------------------------------------------------------


def make_helix(path: Path, budget_bytes: int, max_seqs: int, max_batched: int) -> Any:
    from helix_daemon.engine.config import EngineConfig
    from helix_daemon.engine.engine import Engine

    return Engine.from_config(EngineConfig(
        model=str(path), draft="none", device="cpu", dtype="float32",
        kv_cache_memory=budget_bytes, max_num_seqs=max_seqs, max_num_batched_tokens=max_batched))


def greedy_params(max_tokens: int) -> Any:
    from scheduler.params import RequestParams, SamplingParams

    return RequestParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
                         ignore_eos=True)


def drain(engine: Any, on_step: Callable[[list[Any]], None] = lambda outs: None) -> None:
    while engine.has_unfinished():
        on_step(engine.step())


def run_helix(engine: Any, requests: Sequence[BenchRequest]) -> MethodResult:
    """Requests join between steps at their arrival times; each step's tokens are stamped."""
    for i, req in enumerate(requests[:4]):  # warm-up outside the clock: prefill and batch shapes
        engine.add_request(f"warmup{i}", req.prompt_ids, greedy_params(2))
    drain(engine)
    before = engine.stats()
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    start = time.perf_counter()
    traces = new_traces(requests, start)
    kv = HelixKVSampler(engine)
    while pending or engine.has_unfinished():
        while pending and start + pending[0].arrival_s <= time.perf_counter():
            req = pending.popleft()
            engine.add_request(req.request_id, req.prompt_ids, greedy_params(req.max_tokens))
        if not engine.has_unfinished():
            wait_until(start + pending[0].arrival_s)
            continue
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            traces[out.request_id].add(out.new_token_ids, now)
        kv.sample()
    end = time.perf_counter()
    return helix_result(engine, traces, start, end, before, kv)


class HelixKVSampler:
    """The bench's own per-step KV sample, taken after ``step()`` returns.

    Counts ``num_computed`` (tokens whose KV is in the pool) against the slots of the blocks in
    use, the same definition as the HF continuous sampler; ``EngineStats`` counts a chunked
    prompt's whole length as used while only its first chunks hold slots.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.allocated = self.used = self.peak_blocks = self.max_running = 0

    def sample(self) -> None:
        running = self.engine.scheduler.running
        blocks = self.engine.allocator.num_used
        self.peak_blocks = max(self.peak_blocks, blocks)
        self.max_running = max(self.max_running, len(running))
        self.allocated += blocks * BLOCK_SIZE
        self.used += sum(seq.num_computed for seq in running)

    @property
    def waste(self) -> float | None:
        return 1 - self.used / self.allocated if self.allocated else None


def helix_result(engine: Any, traces: dict[str, RequestTrace], start: float, end: float,
                 before: Any, kv: HelixKVSampler) -> MethodResult:
    after = engine.stats()
    allocated = after.kv_slots_allocated - before.kv_slots_allocated
    used = after.kv_slots_used - before.kv_slots_used
    notes = {"steps": after.num_steps - before.num_steps,
             "preemptions": after.num_preemptions - before.num_preemptions,
             "max_running": kv.max_running, "kv_blocks_total": after.kv_blocks_total,
             "kv_waste_engine_stats": 1 - used / allocated if allocated else None,
             "peak_kv_blocks_bench_sample": kv.peak_blocks,
             # what HELIX_CPU_LINEAR=auto measured at load (runs differ by up to 20 % with it)
             "linear_form": engine.target.linear_form}
    return MethodResult("helix", traces, start, end, after.peak_kv_blocks_used, kv.waste, notes)


# -- the run -------------------------------------------------------------------------------------


def run_method(name: str, args: argparse.Namespace, path: Path,
               requests: Sequence[BenchRequest], budget_tokens: int) -> MethodResult:
    """Run one method, noting how busy the shared machine was meanwhile."""
    print(f"running {name} ...", flush=True)
    load_before, cpu_before, wall_before = (os.getloadavg()[0], time.process_time(),
                                            time.perf_counter())
    result = _run_method(name, args, path, requests, budget_tokens)
    # cores this process really got, loading included (2.0 = both threads never starved); a
    # low figure or a high load average means other jobs were slowing this method down
    result.notes["cpu_cores_used"] = ((time.process_time() - cpu_before)
                                      / (time.perf_counter() - wall_before))
    result.notes["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    print(f"  {name}: {result.summary(None)['tokens_per_s']:.1f} tok/s, "
          f"{result.notes['cpu_cores_used']:.2f} cores, load {result.notes['loadavg_1m']}"
          + (f", linear layers {result.notes['linear_form']}" if "linear_form" in result.notes
             else ""), flush=True)
    return result


def _run_method(name: str, args: argparse.Namespace, path: Path,
                requests: Sequence[BenchRequest], budget_tokens: int) -> MethodResult:
    if name == "helix":
        budget_bytes = budget_tokens * args.model_spec.kv_bytes_per_token()
        engine = make_helix(path, budget_bytes, args.max_seqs, args.max_batched_tokens)
        return run_helix(engine, requests)
    model = load_hf_model(path)
    hf_generate(model, [list(range(1, 20))], 4)  # warm-up outside the clock
    if name == "hf_sequential":
        return run_hf_sequential(model, requests)
    if name == "hf_static":
        return run_hf_static(model, requests, args.batch_size)
    return run_hf_continuous(model, requests, budget_tokens // BLOCK_SIZE,
                             args.max_batched_tokens, args.max_seqs)


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Helix / baseline for throughput, and baseline / Helix for latencies (> 1: Helix better)."""
    if "helix" not in summaries:
        return {}
    helix = summaries["helix"]
    out = {}
    for name in BASELINES:
        if name in summaries:
            base = summaries[name]
            out[name] = {"tokens_per_s": helix["tokens_per_s"] / base["tokens_per_s"],
                         "ttft_p50_speedup": base["ttft_p50_ms"] / helix["ttft_p50_ms"],
                         "itl_p50_speedup": base["itl_p50_ms"] / helix["itl_p50_ms"]}
    return out


def target_checks(summaries: dict[str, dict[str, Any]], ratio: dict[str, dict[str, float]],
                  concurrency: dict[str, float]) -> dict[str, bool | None]:
    tps = {name: r["tokens_per_s"] for name, r in ratio.items()}
    helix = summaries.get("helix", {})
    waste = helix.get("kv_waste")
    return {
        ">=2x hf_continuous": tps["hf_continuous"] >= 2 if "hf_continuous" in tps else None,
        ">=1.5x hf_static": tps["hf_static"] >= 1.5 if "hf_static" in tps else None,
        ">=8x hf_sequential": tps["hf_sequential"] >= 8 if "hf_sequential" in tps else None,
        "kv_waste<4%": waste < 0.04 if waste is not None else None,
        ">=4x contiguous concurrency": concurrency["ratio_min"] >= 4,
        "greedy identical to HF": helix.get("identical_outputs") == helix.get("compared_outputs")
        if "identical_outputs" in helix else None,
    }


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(summaries: dict[str, dict[str, Any]], ratio: dict[str, dict[str, float]],
                concurrency: dict[str, float], checks: dict[str, bool | None]) -> None:
    head = (f"{'method':<14}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
            f"{'ITL p99':>9}{'peak KV':>9}{'KV waste':>10}{'identical':>11}{'Helix/it':>10}")
    print(head + "\n" + "-" * len(head))
    for name, s in summaries.items():
        same = (f"{s['identical_outputs']}/{s['compared_outputs']}"
                if "identical_outputs" in s else "-")
        print(f"{name:<14}{s['tokens_per_s']:>8.1f}{s['ttft_p50_ms']:>10.0f}"
              f"{s['ttft_p99_ms']:>10.0f}{s['itl_p50_ms']:>9.1f}{s['itl_p99_ms']:>9.1f}"
              f"{fmt(s['peak_kv_blocks'], '.0f'):>9}{fmt(s['kv_waste'], '.1%'):>10}{same:>11}"
              f"{fmt(ratio.get(name, {}).get('tokens_per_s'), '.2f'):>10}")
    print("(latencies in ms; peak KV in 16-token blocks; Helix/it = Helix tok/s / method tok/s)")
    c = concurrency
    mib = c["budget_bytes_fp32"] / 2**20
    print(f"\nKV budget {c['budget_tokens']} tokens ({mib:.0f} MiB fp32):"
          f" contiguous {c['contiguous_reservation_tokens']}-token reservations hold "
          f"{c['contiguous_requests']} requests; 16-token pages hold {c['paged_requests_mean']:.1f}"
          f" on average (min {c['paged_requests_min']}) = {c['ratio_mean']:.2f}x "
          f"(min {c['ratio_min']:.2f}x)")
    verdict = {None: "-", True: "yes", False: "NO"}
    print("targets (set for the full run): "
          + ", ".join(f"{k}: {verdict[v]}" for k, v in checks.items()))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 short requests")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--model", help="a real model (folder or .gguf) instead of the random "
                        "one; the workload is then chat")
    parser.add_argument("--workload", choices=("mixed", "reference", "chat"), default=None,
                        help="mixed (default): 48 requests, prompts 16-512, 16-256 new tokens; "
                             "reference: 16 x 128 new tokens, prompts 24-40, all at once; "
                             "chat (default with --model): 48 chat prompts of the model's "
                             "template, 16-256 new tokens")
    parser.add_argument("--num-requests", type=int, help="override the workload size")
    parser.add_argument("--rate", type=float, help="override the arrival rate (requests/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="HF static batch size")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512,
                        help="token budget per step (Helix and HF continuous batching)")
    parser.add_argument("--reservations", type=int, default=16,
                        help="KV budget = this many max-length contiguous reservations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "helix-bench")
    parser.add_argument("--output", type=Path, help="JSON path (default bench/results/"
                        "throughput.json, or throughput-quick.json with --quick)")
    args = parser.parse_args(argv)
    args.workload = args.workload or ("chat" if args.model else "mixed")
    if args.workload == "chat" and not args.model:
        parser.error("--workload chat needs a real model: --model FOLDER_OR_GGUF")
    args.model_spec = QUICK_MODEL if args.quick else FULL_MODEL  # replaced by --model's own
    # a quick smoke run must not overwrite the figures of a full run
    name = "quick" if args.quick else None if args.workload == "mixed" else args.workload
    args.output = args.output or RESULTS / (f"throughput-{name}.json" if name
                                            else "throughput.json")
    return args


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    base = QUICK_WORKLOAD if args.quick else \
        REFERENCE_WORKLOAD if args.workload == "reference" else FULL_WORKLOAD
    return WorkloadSpec(args.num_requests or base.num_requests, base.prompt_len,
                        base.max_tokens, args.rate or base.rate, args.seed)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run the methods in turn; rewrite the JSON after each, so a cut-off run keeps its data."""
    spec = workload_spec(args)
    path, requests = model_and_requests(args, spec)
    model_spec: ModelSpec = args.model_spec
    concurrency = concurrency_report(requests, model_spec, args.reservations)
    names = [m for m in RUN_ORDER if m in args.methods.split(",")]
    results: dict[str, MethodResult] = {}
    report: dict[str, Any] = {}
    for name in names:
        results[name] = run_method(name, args, path, requests, int(concurrency["budget_tokens"]))
        gc.collect()
        report = build_report(args, spec, requests, results, concurrency)
        report["complete"] = len(results) == len(names)
        write_json(args.output, report)
    print_table(report["methods"], report["ratios_helix_over"], concurrency, report["targets"])
    return report


def model_and_requests(args: argparse.Namespace, spec: WorkloadSpec
                       ) -> tuple[Path, list[BenchRequest]]:
    """The model's folder and the workload: random ids for the random model, chat prompts for a
    real one (``args.model_spec`` becomes the real model's)."""
    if not args.model:
        path = build_model(args.model_spec, args.cache_dir, seed=args.seed)
        return path, make_workload(spec, args.model_spec.vocab_size)
    path, args.model_spec = real_model(args.model, args.cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if args.workload == "chat":
        return path, chat_workload(spec, tokenizer)
    return path, make_workload(spec, args.model_spec.vocab_size)


def build_report(args: argparse.Namespace, spec: WorkloadSpec, requests: Sequence[BenchRequest],
                 results: dict[str, MethodResult], concurrency: dict[str, float]) -> dict[str, Any]:
    reference = ({rid: t.tokens for rid, t in results["hf_sequential"].traces.items()}
                 if "hf_sequential" in results else None)
    summaries = {name: results[name].summary(reference) for name in METHODS if name in results}
    ratio = ratios(summaries)
    return {"model": asdict(args.model_spec) | {"source": args.model or "random"},
            "workload": {"kind": args.workload} | asdict(spec) | workload_stats(requests),
            "settings": settings(args), "methods": summaries, "ratios_helix_over": ratio,
            "concurrency": concurrency, "targets": target_checks(summaries, ratio, concurrency)}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def workload_stats(requests: Sequence[BenchRequest]) -> dict[str, Any]:
    return {"total_prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "total_output_tokens": sum(r.max_tokens for r in requests),
            "last_arrival_s": max(r.arrival_s for r in requests)}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"quick": args.quick, "threads": args.threads, "batch_size": args.batch_size,
            "max_seqs": args.max_seqs, "max_batched_tokens": args.max_batched_tokens,
            "reservations": args.reservations, "dtype": "float32", "device": "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    run_all(args)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
