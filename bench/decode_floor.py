"""How close Helix's batch-1 decode step is to the hardware's floor: one step must read every
weight once, so it cannot take less than the model's bytes over the memory bandwidth.

Measures, in one run: this machine's read bandwidth (``sum`` over a buffer far larger than the
caches, best of several), the model's weight bytes (a tied embedding counted once), Helix's median
decode step for one request, and HF ``generate``'s median time per token on the same prompt.
Run ``python bench/decode_floor.py [--model FOLDER_OR_GGUF]`` (default: the bundled SmolLM2);
the table is printed and JSON goes to ``bench/results/decode_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
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
from transformers import AutoModelForCausalLM

from bench.common import real_model
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import bundled_model
from scheduler.params import RequestParams, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "helix-bench"


def read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Bytes per second of reading a float32 buffer of ``num_bytes`` (best of ``repeats``)."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
    buffer.sum()  # first touch outside the clock
    best = min(_timed(buffer.sum) for _ in range(repeats))
    return num_bytes / best


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Every parameter once (``parameters()`` yields a tied tensor a single time)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def helix_step_s(path: Path, prompt: list[int], tokens: int) -> list[float]:
    """Each decode step's time of one greedy request alone (the prefill step left out)."""
    engine = Engine.from_config(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                             num_kv_blocks=64))
    params = RequestParams(max_tokens=tokens, sampling=SamplingParams(temperature=0.0),
                           ignore_eos=True)
    for rid in ("warm-up", "timed"):
        engine.add_request(rid, prompt, params)
        times = []
        while engine.has_unfinished():
            times.append(_timed(engine.step))
    return times[1:]


@torch.inference_mode()
def hf_token_s(path: Path, prompt: list[int], tokens: int) -> float:
    """HF ``generate``'s time per token past the first (its prefill), one request, greedy."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    args = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    model.generate(ids, max_new_tokens=4, **args)  # warm-up
    one = _timed(lambda: model.generate(ids, max_new_tokens=1, **args))
    full = _timed(lambda: model.generate(ids, max_new_tokens=tokens, **args))
    return (full - one) / (tokens - 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="folder or .gguf (default: the bundled SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    path, _ = real_model(args.model or str(bundled_model()), CACHE)
    prompt = list(range(100, 132))
    bandwidth = read_bandwidth()
    model_bytes = weight_bytes(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    steps = helix_step_s(path, prompt, args.tokens)
    hf = hf_token_s(path, prompt, args.tokens)
    floor = model_bytes / bandwidth
    step = statistics.median(steps)
    report = {"model": str(args.model or "bundled SmolLM2-135M-Instruct"),
              "weight_bytes": model_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
              "floor_ms": floor * 1e3, "helix_step_p50_ms": step * 1e3,
              "helix_step_p90_ms": statistics.quantiles(steps, n=10)[-1] * 1e3,
              "hf_token_ms": hf * 1e3, "helix_over_floor": step / floor,
              "hf_over_floor": hf / floor, "threads": args.threads, "tokens": args.tokens,
              "torch": torch.__version__, "machine": platform.machine(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"weights {model_bytes / 1e6:.0f} MB, read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"-> floor {floor * 1e3:.1f} ms per decode step")
    print(f"{'':<22}{'ms/token':>10}{'x floor':>9}")
    print(f"{'weight-read floor':<22}{floor * 1e3:>10.1f}{1:>9.2f}")
    print(f"{'Helix step (p50)':<22}{step * 1e3:>10.1f}{step / floor:>9.2f}")
    print(f"{'HF generate':<22}{hf * 1e3:>10.1f}{hf / floor:>9.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "decode_floor.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
