"""Speculative decoding: Helix with a draft model or n-gram drafter against Helix without, against
Hugging Face assisted generation and prompt lookup, at batch 1, 4, 16 and 64.

Random independent models almost never agree, so the draft/target pair is built to agree the way a
real pair does: the target is the draft plus extra layers whose residual contribution is scaled
down (``helix_daemon.testing.tiny_models.build_draft_target_pair``). Every method runs greedy,
float32, on the same prompts; α (acceptance), K, c (draft pass / target step) and the theoretical
speedup (1 - α^(K+1)) / ((1 - α)(1 + K c)) are reported beside the measured one.
With ``--model`` (a folder or ``.gguf``) the target is that real model instead, with the n-gram
drafter (and ``--draft`` for a draft model), on a copy-heavy chat task: proofreading paragraphs,
where most of the answer is in the prompt; requests stop at the model's end of turn.
Run ``python bench/speculative.py [--quick | --model FILE]``; results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from bench.chat_workload import copy_prompts
from bench.common import real_model
from helix_daemon.engine.config import CPU_LINEAR_CHOICES, EngineConfig
from helix_daemon.engine.drafting import Drafts
from helix_daemon.engine.engine import Engine
from helix_daemon.testing.tiny_models import build_draft_target_pair
from scheduler.params import RequestParams, SamplingParams
from scheduler.scheduler import StepPlan

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("HELIX_BENCH_CACHE", Path.home() / ".cache" / "helix-bench"))


@dataclass(frozen=True, slots=True)
class PairSpec:
    name: str
    hidden_size: int
    draft_layers: int
    extra_layers: int  # target layers = draft_layers + extra_layers
    num_heads: int
    vocab_size: int
    residual_scale: float  # smaller: the target's extra layers move it less, α is higher


FULL_PAIR = PairSpec("pair-768", 768, 1, 11, 12, 8192, 0.05)
QUICK_PAIR = PairSpec("pair-128", 128, 1, 5, 4, 512, 0.05)


def build_pair(spec: PairSpec) -> tuple[Path, Path]:
    """Save the pair once under the bench cache, EOS switched off so every run is full length."""
    root = CACHE / spec.name
    draft, target = root / "draft", root / "target"
    if not (target / "config.json").exists():
        build_draft_target_pair(draft, target, extra_layers=spec.extra_layers,
                                residual_scale=spec.residual_scale, hidden_size=spec.hidden_size,
                                num_layers=spec.draft_layers, num_heads=spec.num_heads,
                                vocab_size=spec.vocab_size, max_positions=2048)
        for path in (draft, target):
            config = GenerationConfig.from_pretrained(path)
            config.eos_token_id = None
            config.save_pretrained(path)
    return draft, target


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: int
    eos_token_id: int | list[int] | None = None  # None: every request runs max_tokens


def make_workload(num: int, vocab: int, max_tokens: int, seed: int = 0) -> Workload:
    """Random prompts of 32-96 ids (for the built pair)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(32, 96))] for _ in range(num)]
    return Workload(prompts, max_tokens)


@dataclass(slots=True)
class Run:
    """One method at one batch size: wall time, outputs, and the speculation counters."""

    method: str
    batch: int
    seconds: float
    outputs: list[list[int]]
    steps: int = 0  # target forwards
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0  # seq-steps where a draft was rejected (acceptance stops there)
    drafting_seq_steps: int = 0  # seq-steps that proposed at least one draft
    draft_seconds: float = 0.0
    draft_passes: int = 0
    step_seconds: list[float] = field(default_factory=list)
    forwards: list[tuple[int, float]] = field(default_factory=list)  # (tokens, s) per target pass
    # every round's tok/s of this method at this batch (this run is the fastest): their spread
    # is this machine's noise, against which the ratios between methods must be read
    round_tokens_per_s: list[float] = field(default_factory=list)

    def median_forward_s(self, tokens: Sequence[int]) -> float | None:
        times = [s for n, s in self.forwards if n in tokens]
        return statistics.median(times) if times else None

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def alpha(self) -> float | None:
        """Per-token acceptance: accepted / (accepted + first rejections), the geometric MLE."""
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else None

    @property
    def mean_k(self) -> float | None:
        return self.proposed / self.drafting_seq_steps if self.drafting_seq_steps else None


# -- Helix ------------------------------------------------------------------------------------


def greedy(work: Workload, max_tokens: int | None = None) -> RequestParams:
    return RequestParams(max_tokens=max_tokens or work.max_tokens,
                         sampling=SamplingParams(temperature=0.0),
                         ignore_eos=work.eos_token_id is None)


def make_engine(target: Path, draft: str, num_k: int, cpu_linear: str = "auto") -> Engine:
    # 64 sequences of at most 96 + 96 tokens and K ahead take 832 blocks; four engines with
    # 4096 blocks each held 19 GB of a 24 GB machine
    config = EngineConfig(model=str(target), draft=draft, device="cpu", dtype="float32",
                          num_kv_blocks=1024, max_num_seqs=128, max_num_batched_tokens=2048,
                          num_speculative_tokens=num_k, cpu_linear=cpu_linear)
    return Engine.from_config(config)


def run_helix(engine: Engine, method: str, work: Workload, batch: int) -> Run:
    """Serve the prompts ``batch`` at a time (all of a group submitted together)."""
    _warm_up(engine, work, batch)
    before_steps = engine.stats().num_steps
    run = Run(method, batch, 0.0, [])
    _time_target_forwards(engine, run)
    _time_draft_passes(engine, run)
    start = time.perf_counter()
    for first in range(0, len(work.prompts), batch):
        group = work.prompts[first: first + batch]
        outputs = {f"b{first + i}": [] for i in range(len(group))}
        seen = {rid: (0, 0) for rid in outputs}
        for rid, prompt in zip(outputs, group):
            engine.add_request(rid, prompt, greedy(work))
        while engine.has_unfinished():
            step_start = time.perf_counter()
            step_outputs = engine.step()
            run.step_seconds.append(time.perf_counter() - step_start)
            for out in step_outputs:
                outputs[out.request_id] += out.new_token_ids
                _count_drafts(run, out, seen)
        run.outputs += outputs.values()
    run.seconds = time.perf_counter() - start
    run.steps = engine.stats().num_steps - before_steps
    del engine.target.forward  # back to the class's methods
    if engine.drafter is not None:
        del engine.drafter.propose
    return run


def run_helix_rounds(engines: dict[str, Engine], work: Workload, batch: int,
                     rounds: int) -> list[Run]:
    """Each engine's fastest of ``rounds`` runs, the order reversed every other round, so that
    a drift in this shared machine's speed over minutes favours no method (one pass in a fixed
    order swung the ratios by 5-10 %)."""
    names = list(engines)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            runs[name].append(run_helix(engines[name], name, work, batch))
    best = [max(runs[name], key=lambda r: r.tokens_per_s) for name in names]
    for run, name in zip(best, names):
        run.round_tokens_per_s = [r.tokens_per_s for r in runs[name]]
    return best


def _time_target_forwards(engine: Engine, run: Run) -> None:
    """Record each target forward's size and time (the verify cost the theory assumes free)."""
    forward = engine.target.forward

    def timed(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        started = time.perf_counter()
        logits = forward(input_ids, *args, **kwargs)
        run.forwards.append((len(input_ids), time.perf_counter() - started))
        return logits

    engine.target.forward = timed


def _time_draft_passes(engine: Engine, run: Run) -> None:
    """Add up the draft passes each ``propose`` reports (the drafter times each of them)."""
    drafter = engine.drafter
    if drafter is None:
        return
    propose = drafter.propose

    def timed(plan: StepPlan) -> Drafts:
        drafts = propose(plan)
        run.draft_seconds += sum(p.seconds for p in drafts.passes)
        run.draft_passes += len(drafts.passes)
        return drafts

    drafter.propose = timed  # type: ignore[method-assign]


def _count_drafts(run: Run, out: Any, seen: dict[str, tuple[int, int]]) -> None:
    """Per-step draft counters from the outputs' cumulative per-request ones."""
    proposed = out.num_draft_proposed - seen[out.request_id][0]
    accepted = out.num_draft_accepted - seen[out.request_id][1]
    seen[out.request_id] = (out.num_draft_proposed, out.num_draft_accepted)
    if proposed:
        run.proposed += proposed
        run.accepted += accepted
        run.drafting_seq_steps += 1
        run.rejections += accepted < proposed


def _warm_up(engine: Engine, work: Workload, batch: int) -> None:
    """A few steps at the run's batch size, so no method pays for first-seen shapes."""
    for i, prompt in enumerate(work.prompts[:batch]):
        engine.add_request(f"warm{i}", prompt, greedy(work, 8))
    while engine.has_unfinished():
        engine.step()


# -- Hugging Face, batch 1 --------------------------------------------------------------------


def load_hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@torch.inference_mode()
def run_hf(method: str, work: Workload, **generate_kw: Any) -> Run:
    """``generate`` one prompt at a time (assisted generation supports batch 1 only)."""
    model = generate_kw.pop("model")
    args = {"max_new_tokens": work.max_tokens, "do_sample": False, "pad_token_id": 0,
            "eos_token_id": work.eos_token_id, **generate_kw}
    model.generate(torch.tensor([work.prompts[0]]), **(args | {"max_new_tokens": 8}))  # warm-up
    outputs = []
    start = time.perf_counter()
    for prompt in work.prompts:
        ids = model.generate(torch.tensor([prompt]), **args)
        outputs.append(_cut_at_eos(ids[0, len(prompt):].tolist(), work.eos_token_id))
    return Run(method, 1, time.perf_counter() - start, outputs)


def _cut_at_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """Up to and including the first EOS, as Helix stops (generate pads finished rows)."""
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end]


# -- report -----------------------------------------------------------------------------------


def theoretical_speedup(alpha: float, k: float, c: float, v: float = 1.0) -> float:
    """Leviathan et al.: expected tokens per step over the step's cost in target steps, with a
    verify forward costing ``v`` plain ones (the classic formula takes v = 1)."""
    if alpha >= 1.0:
        return (k + 1) / (v + k * c)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (v + k * c))


def summarise(run: Run, plain: Run | None, reference: list[list[int]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": run.method, "batch": run.batch, "tokens": run.tokens,
        "seconds": run.seconds, "tokens_per_s": run.tokens_per_s,
        "identical": sum(o == r for o, r in zip(run.outputs, reference)),
        "compared": len(reference),
    }
    if plain is not None:
        row["speedup_vs_helix_plain"] = run.tokens_per_s / plain.tokens_per_s
    if run.round_tokens_per_s:
        row["round_tokens_per_s"] = run.round_tokens_per_s
    if run.proposed:
        step_time = statistics.median(plain.step_seconds) if plain else None
        c = (run.draft_seconds / run.draft_passes) / step_time if step_time and \
            run.draft_passes else 0.0
        row |= {"alpha": run.alpha, "mean_k": run.mean_k, "c": c,
                "acceptance_rate": run.accepted / run.proposed,
                "tokens_per_target_forward_per_seq": run.tokens / (run.tokens - run.accepted),
                "theoretical_speedup": theoretical_speedup(run.alpha or 0.0, run.mean_k or 0, c)}
        row["measured_over_theory"] = row["speedup_vs_helix_plain"] / row["theoretical_speedup"]
        row |= _verify_cost(run, plain, c)
    return row


def _verify_cost(run: Run, plain: Run | None, c: float) -> dict[str, Any]:
    """v = the median verify forward (more than ``batch`` tokens, at most ``batch`` x (K+2))
    over the median plain decode forward (``batch`` tokens), and the theory with that cost in:
    (1 - α^(K+1)) / ((1 - α)(v + K c)). The classic formula takes v = 1, which holds where a
    forward is bound by reading the weights; where more rows cost more (a CPU's small matrix
    multiplies, any compute-bound batch) it promises more than any policy can deliver."""
    if plain is None or not run.mean_k:
        return {}
    b = run.batch
    step = plain.median_forward_s([b])
    verify = run.median_forward_s(range(b + 1, b * (int(math.ceil(run.mean_k)) + 2) + 1))
    if not step or not verify:
        return {}
    v = verify / step
    return {"verify_cost": v,
            "theory_with_verify_cost": theoretical_speedup(run.alpha or 0.0, run.mean_k, c, v)}


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = (f"{'batch':>5} {'method':<18} {'tok/s':>8} {'vs plain':>8} {'alpha':>6} {'K':>5} "
            f"{'c':>5} {'theory':>6} {'meas/th':>7} {'v':>5} {'th(v)':>6} {'tok/fwd':>7} "
            f"{'identical':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['batch']:>5} {r['method']:<18} {r['tokens_per_s']:>8.1f} "
              f"{fmt(r.get('speedup_vs_helix_plain'), '.2f'):>8} {fmt(r.get('alpha'), '.3f'):>6} "
              f"{fmt(r.get('mean_k'), '.2f'):>5} {fmt(r.get('c'), '.3f'):>5} "
              f"{fmt(r.get('theoretical_speedup'), '.2f'):>6} "
              f"{fmt(r.get('measured_over_theory'), '.2f'):>7} "
              f"{fmt(r.get('verify_cost'), '.2f'):>5} "
              f"{fmt(r.get('theory_with_verify_cost'), '.2f'):>6} "
              f"{fmt(r.get('tokens_per_target_forward_per_seq'), '.2f'):>7} "
              f"{r['identical']:>4}/{r['compared']:<4}")


def check_targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    def find(method: str, batch: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == method and r["batch"] == batch), None)

    spec1, assisted = find("helix+draft", 1), find("hf_assisted", 1)
    largest = max(r["batch"] for r in rows)
    spec_big = find("helix+draft", largest)
    targets = {}
    if spec1:
        # no row value when adaptive K never drafted: then there is no speedup to compare
        targets["batch 1: measured >= 90% of theory"] = \
            spec1.get("measured_over_theory", 0.0) >= 0.9
    if spec1 and assisted:
        targets["batch 1: >= 1.3x HF assisted"] = \
            spec1["tokens_per_s"] >= 1.3 * assisted["tokens_per_s"]
    if spec_big:
        targets[f"batch {largest}: >= 0.97x Helix without speculation"] = \
            spec_big["speedup_vs_helix_plain"] >= 0.97
    ngram1, ngram_big = find("helix+ngram", 1), find("helix+ngram", largest)
    if spec1 is None and ngram1 and ngram_big:  # a real model's copy-heavy task
        targets["batch 1: n-gram >= 1.6x Helix plain"] = \
            ngram1["speedup_vs_helix_plain"] >= 1.6
        targets[f"batch {largest}: n-gram >= 0.97x Helix plain"] = \
            ngram_big["speedup_vs_helix_plain"] >= 0.97
    targets["greedy identical everywhere"] = all(r["identical"] == r["compared"] for r in rows)
    return targets


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pair, batches 1 and 4")
    parser.add_argument("--model", help="a real target (folder or .gguf): n-gram drafter on a "
                                        "copy-heavy chat task, batches 1 and 32")
    parser.add_argument("--draft", help="with --model: a draft model too (folder or .gguf)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--num-speculative", type=int, default=4, help="most K per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each Helix method per batch size; the fastest counts")
    parser.add_argument("--cpu-linear", default="auto", choices=CPU_LINEAR_CHOICES,
                        help="how Helix runs linear layers on CPU "
                             "(helix_daemon/engine/cpu_linear.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = real_setup(args) if args.model else pair_setup(args)
    rows = run_batches(args, setup)
    print()
    print_table(rows)
    targets = check_targets(rows)
    print("targets:", ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in targets.items()))
    RESULTS.mkdir(exist_ok=True)
    name = "speculative-quick" if args.quick else "speculative"
    out = RESULTS / (f"{name}-{setup.name}.json" if args.model else f"{name}.json")
    out.write_text(json.dumps({
        "models": setup.name, "pair": asdict(setup.pair) if setup.pair else None,
        "max_tokens": setup.max_tokens, "num_speculative_tokens": args.num_speculative,
        "rows": rows, "targets": targets, "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.machine(),
        "threads": args.threads, "rounds": args.rounds, "loadavg": os.getloadavg(),
    }, indent=2))
    print(f"wrote {out}")


@dataclass
class Setup:
    """What one run compares: the target, its draft (None: n-gram only) and the prompts."""

    name: str
    target: Path
    draft: Path | None
    batches: list[int]
    max_tokens: int
    prompts: Callable[[int], list[list[int]]]  # prompts for a batch size
    eos_token_id: int | list[int] | None
    pair: PairSpec | None = None


def pair_setup(args: argparse.Namespace) -> Setup:
    spec = QUICK_PAIR if args.quick else FULL_PAIR
    draft, target = build_pair(spec)
    return Setup(spec.name, target, draft, _batches(args, "1,4" if args.quick else "1,4,16,64"),
                 args.max_tokens or (32 if args.quick else 96),
                 lambda batch: make_workload(max(batch, 4), spec.vocab_size, 0).prompts,
                 None, spec)


def real_setup(args: argparse.Namespace) -> Setup:
    target, _ = real_model(args.model, CACHE)
    draft = real_model(args.draft, CACHE)[0] if args.draft else None
    tokenizer = AutoTokenizer.from_pretrained(target)
    eos = GenerationConfig.from_pretrained(target).eos_token_id
    return Setup(Path(args.model).stem, target, draft,
                 _batches(args, "1,4" if args.quick else "1,32"), args.max_tokens or 128,
                 lambda batch: copy_prompts(tokenizer, max(batch, 4)), eos)


def _batches(args: argparse.Namespace, default: str) -> list[int]:
    return [int(b) for b in (args.batches or default).split(",")]


def run_batches(args: argparse.Namespace, setup: Setup) -> list[dict[str, Any]]:
    k, form = args.num_speculative, args.cpu_linear
    engines = {"helix": make_engine(setup.target, "none", 0, form)}
    if setup.draft is not None:
        engines["helix+draft"] = make_engine(setup.target, str(setup.draft), k, form)
    engines["helix+ngram"] = make_engine(setup.target, "ngram", k, form)
    if form != "blas" and setup.pair is not None:
        # Helix's plain decoding with F.linear, as HF runs it: how much of Helix's lead over HF
        # comes from its linear layers rather than from scheduling or speculation
        engines["helix(F.linear)"] = make_engine(setup.target, "none", 0, "blas")
    hf_target = load_hf(setup.target)
    hf_draft = load_hf(setup.draft) if setup.draft is not None else None
    rows: list[dict[str, Any]] = []
    for batch in setup.batches:
        work = Workload(setup.prompts(batch), setup.max_tokens, setup.eos_token_id)
        print(f"batch {batch}: {len(work.prompts)} prompts x {work.max_tokens} tokens",
              flush=True)
        hf_runs = _hf_batch_1(args, work, hf_target, hf_draft) if batch == 1 else []
        reference = hf_runs[0].outputs if hf_runs else _reference(hf_target, work)
        helix_runs = run_helix_rounds(engines, work, batch, args.rounds)
        plain = helix_runs[0]
        runs = [*hf_runs, *helix_runs]
        rows += [summarise(r, plain if r.method.startswith("helix") else None, reference)
                 for r in runs]
        for r in runs:
            rounds = " / ".join(f"{x:.1f}" for x in r.round_tokens_per_s)
            print(f"  {r.method}: {r.tokens_per_s:.1f} tok/s" +
                  (f" (rounds: {rounds})" if len(r.round_tokens_per_s) > 1 else ""), flush=True)
    return rows


def _hf_batch_1(args: argparse.Namespace, work: Workload, target: torch.nn.Module,
                draft: torch.nn.Module | None) -> list[Run]:
    runs = [run_hf("hf_generate", work, model=target)]
    if draft is not None:
        runs.append(run_hf("hf_assisted", work, model=target, assistant_model=draft))
    runs.append(run_hf("hf_prompt_lookup", work, model=target,
                       prompt_lookup_num_tokens=args.num_speculative))
    return runs


def _reference(model: torch.nn.Module, work: Workload) -> list[list[int]]:
    """The target alone, one prompt at a time: what every greedy method must reproduce."""
    return run_hf("hf_generate", work, model=model).outputs


if __name__ == "__main__":
    main()
