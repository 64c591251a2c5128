"""Weight-only quantization on the real SmolLM2-135M-Instruct (its bundled GGUF): Helix in
float32, bfloat16, int8, int4 and auto (the GGUF's own Q4_1 blocks as int4; bfloat16
activations), HF ``generate`` in float32 and llama.cpp on the same blocks (when
``llama-cpp-python`` is installed), in one run.

Per row: weight bytes in memory, batch-1 decode tok/s (median step, prefill left out), 8 and 32
concurrent chat requests' tok/s (prefill included), each relative to Helix float32, and the
batch-1 step as a share of the weight-read floor (weight bytes over this machine's measured read
bandwidth). Run ``python bench/quantized.py [--quick]``; JSON goes to
``bench/results/quantized.json`` (``quantized-quick.json`` with ``--quick``). On a shared
machine the figures are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoTokenizer

from bench.chat_workload import render
from bench.common import real_model
from bench.decode_floor import hf_token_s, read_bandwidth
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import bundled_model
from scheduler.params import RequestParams, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "helix-bench"
MODES = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"), ("bfloat16", "int4"),
         ("bfloat16", "auto")]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Why is the sky blue?", "List three primary colours.",
             "Explain in one sentence what a CPU does.", "Name a large animal.",
             "How do plants make food?", "What is a prime number?"]


def greedy(tokens: int) -> RequestParams:
    return RequestParams(max_tokens=tokens, sampling=SamplingParams(temperature=0.0),
                         ignore_eos=True)


def batch1_step_s(engine: Engine, prompt: list[int], tokens: int) -> float:
    """Median decode step of one request alone (its prefill step left out)."""
    times = []
    for rid in ("warm-up", "timed"):
        engine.add_request(rid, prompt, greedy(tokens))
        times = []
        while engine.has_unfinished():
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def concurrent_tok_s(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Generated tokens per second of all ``prompts`` submitted at once (prefill included)."""
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{len(prompts)}-{i}", prompt, greedy(tokens))
    while engine.has_unfinished():
        engine.step()
    return len(prompts) * tokens / (time.perf_counter() - started)


def helix_row(gguf: Path, dtype: str, quantization: str, prompts: list[list[int]],
              tokens: int, concurrency: Sequence[int]) -> dict[str, Any]:
    """Helix on the GGUF (its cached float32 folder; ``auto`` also reads the file's blocks)."""
    engine = Engine.from_config(EngineConfig(model=str(gguf), model_cache_dir=str(CACHE / "models"),
                                             device="cpu", dtype=dtype, quantization=quantization,
                                             num_kv_blocks=1024))
    name = {"none": "", "auto": " auto (GGUF Q4_1 blocks)"}.get(quantization, f" {quantization}")
    row = {"system": f"Helix {dtype}{name}", "weight_bytes": engine.weight_bytes,
           "batch1_tok_s": 1 / batch1_step_s(engine, prompts[0], tokens)}
    for n in concurrency:
        row[f"c{n}_tok_s"] = concurrent_tok_s(engine, (prompts * n)[:n], tokens)
    return row


def llama_cpp_row(gguf: Path, prompt: list[int], tokens: int, threads: int) -> dict[str, Any]:
    """llama.cpp on the GGUF's own blocks, batch 1 (its Python API runs one sequence)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False)

    def run(n: int) -> float:
        llm.reset()
        started = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if i + 1 == n:
                break
        return time.perf_counter() - started

    run(4)  # warm-up
    per_token = (run(tokens) - run(1)) / (tokens - 1)
    return {"system": "llama.cpp Q4_1 (GGUF blocks)", "weight_bytes": gguf.stat().st_size,
            "batch1_tok_s": 1 / per_token}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, 8 concurrent only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tokens, concurrency = (32, (8,)) if args.quick else (128, (8, 32))
    gguf = bundled_model()
    path, _ = real_model(str(gguf), CACHE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [render(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    bandwidth = read_bandwidth(1 << 28 if args.quick else 1 << 30)
    rows = [helix_row(gguf, d, q, prompts, tokens, concurrency) for d, q in MODES]
    rows.append({"system": "HF generate float32", "weight_bytes": rows[0]["weight_bytes"],
                 "batch1_tok_s": 1 / hf_token_s(path, prompts[0], tokens)})
    try:
        rows.append(llama_cpp_row(gguf, prompts[0], tokens, args.threads))
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row")
    base = rows[0]
    for row in rows:
        row["floor_share"] = (row["weight_bytes"] / bandwidth) * row["batch1_tok_s"]
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {tokens} tokens per request, "
          f"{args.threads} threads")
    conc = "".join(f"{f'c{n} tok/s':>12}{'x f32':>7}" for n in concurrency)
    print(f"{'system':<40}{'weights MB':>11}{'b1 tok/s':>10}{'x f32':>7}{conc}{'floor':>7}")
    for row in rows:
        cells = "".join(
            f"{row[f'c{n}_tok_s']:>12.1f}{row[f'c{n}_tok_s'] / base[f'c{n}_tok_s']:>7.2f}"
            if f"c{n}_tok_s" in row else f"{'-':>12}{'-':>7}" for n in concurrency)
        print(f"{row['system']:<40}{row['weight_bytes'] / 1e6:>11.0f}{row['batch1_tok_s']:>10.1f}"
              f"{row['batch1_tok_s'] / base['batch1_tok_s']:>7.2f}{cells}"
              f"{row['floor_share']:>7.0%}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("quantized-quick.json" if args.quick else "quantized.json")
    report = {"rows": rows, "read_bandwidth_gb_s": bandwidth / 1e9, "tokens": tokens,
              "threads": args.threads, "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
