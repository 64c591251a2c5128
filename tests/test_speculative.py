"""Speculative decoding: greedy output equals the target alone; sampling keeps p exactly."""

from __future__ import annotations

import collections
import functools
import tempfile

import pytest
import torch
from scipy import stats

from helix_daemon.engine.engine import Engine
from helix_daemon.testing.tiny_models import build_draft_target_pair, build_tiny_model
from scheduler.params import RequestParams, SamplingParams
from scheduler.sampling import shape_probs
from tests.engine_utils import hf_greedy, make_engine, mixed_jobs, run_engine


@functools.cache
def pair() -> tuple[str, str]:
    """A draft and a target that agree often (target = draft + small residual layers)."""
    draft, target = build_draft_target_pair(tempfile.mkdtemp(), tempfile.mkdtemp(),
                                            residual_scale=0.1)
    return str(draft), str(target)


@functools.cache
def reference() -> dict[str, list[int]]:
    _, target = pair()
    return {j.request_id: hf_greedy(target, j.prompt_ids, j.max_tokens) for j in mixed_jobs()}


@pytest.mark.parametrize("drafter,overrides", [
    ("model", {"num_kv_blocks": 512}),
    ("model", {"num_kv_blocks": 40, "max_num_batched_tokens": 128}),  # forced preemption
    ("ngram", {"num_kv_blocks": 512}),
    ("ngram", {"num_kv_blocks": 40, "max_num_batched_tokens": 128}),
    ("model", {"num_kv_blocks": 512, "adaptive_speculation": True}),
])
def test_greedy_speculation_matches_target_alone(drafter: str, overrides: dict[str, int]) -> None:
    """18 mixed requests decoded with drafts are token-identical to HF generate of the target.

    With fixed K drafts are really proposed and partly accepted; with the small pool preemption
    happens too; afterwards every block is free. With adaptive K (which drafts as its timings
    say, so how much varies with the machine's load) the output is the same.
    """
    draft, target = pair()
    settings = {"adaptive_speculation": False, **overrides}
    engine = make_engine(target, draft=draft if drafter == "model" else "ngram",
                         num_speculative_tokens=4, **settings)
    assert run_engine(engine, mixed_jobs()) == reference()
    stats_ = engine.stats()
    if not settings["adaptive_speculation"]:
        assert stats_.num_draft_proposed > 0 and stats_.num_draft_accepted > 0
    if overrides["num_kv_blocks"] == 40:
        assert stats_.num_preemptions > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_rejections_roll_back_cleanly_and_k0_is_plain_decoding() -> None:
    """An unrelated draft is rejected almost always: output is still exact and no block leaks.

    K = 0 for every request (per-request override) runs the same path as plain decoding.
    """
    _, target = pair()
    unrelated = str(build_tiny_model(tempfile.mkdtemp(), "llama", seed=99))
    jobs = mixed_jobs(n=10, seed=5)
    expected = {j.request_id: hf_greedy(target, j.prompt_ids, j.max_tokens) for j in jobs}
    engine = make_engine(target, draft=unrelated, num_kv_blocks=256, adaptive_speculation=False)
    assert run_engine(engine, jobs) == expected
    stats_ = engine.stats()
    assert stats_.num_draft_accepted < stats_.num_draft_proposed / 2
    assert engine.allocator.num_free == engine.allocator.num_blocks

    engine = make_engine(target, draft=unrelated, num_kv_blocks=256)
    k0 = run_engine(engine, jobs, lambda job: RequestParams(
        max_tokens=job.max_tokens, sampling=SamplingParams(temperature=0.0),
        num_speculative_tokens=0))
    assert k0 == expected and engine.stats().num_draft_proposed == 0


SMALL_VOCAB = {"vocab_size": 12, "hidden_size": 32, "num_heads": 2}
NUM_SAMPLES = 20_000


def _sample_first_tokens(engine: Engine, prompt: list[int], sampling: SamplingParams,
                         n: int) -> collections.Counter[tuple[int, ...]]:
    counts: collections.Counter[tuple[int, ...]] = collections.Counter()
    outputs: dict[str, list[int]] = {}
    submitted = 0
    while submitted < n or engine.has_unfinished():
        while submitted < n and len(engine.scheduler.waiting) < 512:
            # the first token comes from the prefill step; a third lets the second be drafted
            params = RequestParams(max_tokens=3, ignore_eos=True, sampling=SamplingParams(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                min_p=sampling.min_p, seed=submitted))
            engine.add_request(f"s{submitted}", prompt, params)
            submitted += 1
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                counts[tuple(outputs.pop(out.request_id)[:2])] += 1
    return counts


def _analytic(target: str, prompt: list[int], sampling: SamplingParams) -> dict[tuple, float]:
    """Exact joint distribution of the first two tokens under the request's sampling settings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    with torch.no_grad():
        p1 = shape_probs(model(torch.tensor([prompt])).logits[0, -1:], [sampling])[0]
        joint = {}
        for x1 in range(len(p1)):
            if p1[x1] > 0:
                logits = model(torch.tensor([[*prompt, x1]])).logits[0, -1:]
                p2 = shape_probs(logits, [sampling])[0]
                for x2 in range(len(p2)):
                    joint[(x1, x2)] = float(p1[x1] * p2[x2])
    return joint


def _chi2_pvalue(counts: collections.Counter, expected_probs: dict[tuple, float]) -> float:
    """Pearson χ² over cells, pooling cells with expected count < 5 into one."""
    n = sum(counts.values())
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in expected_probs.items():
        if n * p >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(n * p)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += n * p
    assert sum(c for cell, c in counts.items() if cell not in expected_probs) == 0
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.02),
])
def test_speculative_sampling_keeps_the_target_distribution(sampling: SamplingParams) -> None:
    """20,000 seeded samples through the engine with a deliberately different draft.

    The joint distribution of the first two tokens passes χ² against the analytic target
    distribution, and against the same count sampled without speculation (p > 0.001).
    """
    with tempfile.TemporaryDirectory() as d:
        target = str(build_tiny_model(f"{d}/t", "llama", seed=1, **SMALL_VOCAB))
        draft = str(build_tiny_model(f"{d}/d", "llama", seed=2, **SMALL_VOCAB))
        prompt = [3, 1, 4, 1, 5]
        common = {"num_kv_blocks": 2048, "max_num_seqs": 512, "max_num_batched_tokens": 4096}
        spec = make_engine(target, draft=draft, num_speculative_tokens=2,
                           adaptive_speculation=False, **common)
        plain = make_engine(target, **common)
        with_spec = _sample_first_tokens(spec, prompt, sampling, NUM_SAMPLES)
        without = _sample_first_tokens(plain, prompt, sampling, NUM_SAMPLES)
        analytic = _analytic(target, prompt, sampling)
    assert spec.stats().num_draft_proposed > 0
    assert spec.stats().num_draft_accepted < spec.stats().num_draft_proposed  # rejections ran
    assert _chi2_pvalue(with_spec, analytic) > 0.001
    assert _chi2_pvalue(without, analytic) > 0.001
    cells = sorted(set(with_spec) | set(without))
    table = [[with_spec.get(c, 0) for c in cells], [without.get(c, 0) for c in cells]]
    keep = [i for i in range(len(cells)) if table[0][i] + table[1][i] >= 10]
    rest = [sum(row[i] for i in range(len(cells)) if i not in keep) for row in table]
    pooled = [[r] if sum(rest) else [] for r in rest]  # rare cells pooled, when there are any
    contingency = [[row[i] for i in keep] + extra for row, extra in zip(table, pooled)]
    assert stats.chi2_contingency(contingency).pvalue > 0.001


def test_draft_with_another_vocabulary_is_refused_at_load() -> None:
    """A draft model whose tokenizer differs from the target's cannot propose valid tokens:
    loading it fails at once with an error that names the problem."""
    from helix_daemon.engine.model_drafter import DraftModelMismatch

    _, target = pair()
    other = str(build_tiny_model(tempfile.mkdtemp(), "llama", seed=3, vocab_size=600))
    with pytest.raises(DraftModelMismatch, match="same tokenizer"):
        make_engine(target, draft=other, num_kv_blocks=64)
