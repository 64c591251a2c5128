"""Prefix caching through the real engine (float64): the same tokens with the cache on and off,
on workloads built to hit it, with both drafters, preemption, evictions and chunked prefill."""

from __future__ import annotations

import random

import pytest

from helix_daemon.engine.engine import Engine
from scheduler.params import RequestParams, SamplingParams
from tests.engine_utils import Job, greedy, hf_greedy, make_engine, run_engine
from tests.test_speculative import pair
from tests.tiny import tiny_model

LLAMA = {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 64}


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model("llama", **LLAMA)


def shared_prefix_jobs(n: int = 16, seed: int = 0, vocab: int = 512) -> list[Job]:
    """Requests built from three shared prefixes of non-block-aligned lengths (37, 70, 133
    tokens), nested (the 70 starts with the 37), each with its own 1-40-token tail and
    1-30 new tokens, arriving over the first 10 steps; two repeat a whole earlier prompt."""
    rng = random.Random(seed)
    base = [rng.randrange(1, vocab) for _ in range(133)]
    other = [rng.randrange(1, vocab) for _ in range(70)]
    prefixes = [base[:37], base[:37] + other[:33], base]
    jobs: list[Job] = []
    for i in range(n):
        prompt = rng.choice(prefixes) + [rng.randrange(1, vocab)
                                         for _ in range(rng.randint(1, 40))]
        if i in (5, 11):  # an exact repeat: hits all but its last partial block
            prompt = list(jobs[i - 3].prompt_ids)
        jobs.append(Job(f"r{i}", prompt, rng.randint(1, 30), rng.randint(0, 10)))
    return jobs


def _run(engine: Engine, jobs: list[Job]) -> dict[str, list[int]]:
    outputs = run_engine(engine, jobs)
    engine.check_integrity()
    assert engine.allocator.num_used == 0  # every block is free or cached-and-free
    return outputs


@pytest.mark.parametrize("name,overrides", [
    ("roomy pool", {"num_kv_blocks": 512, "max_num_batched_tokens": 1024}),
    ("chunked prefill", {"num_kv_blocks": 512, "max_num_batched_tokens": 40}),
    ("preemption and evictions", {"num_kv_blocks": 30, "max_num_batched_tokens": 128}),
])
def test_greedy_identical_with_cache_on_and_off(path: str, name: str,
                                                overrides: dict[str, int]) -> None:
    """Shared-prefix requests give HF's exact greedy tokens with caching on, as with it off;
    the cache is really hit (and, in the small pool, blocks are evicted and requests
    preempted)."""
    jobs = shared_prefix_jobs()
    on = make_engine(path, **overrides)
    off = make_engine(path, enable_prefix_caching=False, **overrides)
    out_on, out_off = _run(on, jobs), _run(off, jobs)
    assert out_on == out_off
    assert out_on == {j.request_id: hf_greedy(path, j.prompt_ids, j.max_tokens) for j in jobs}
    stats = on.stats()
    assert stats.prefix_cache_hits > 0 and off.stats().prefix_cache_hits == 0
    if name.startswith("preemption"):
        assert stats.num_preemptions > 0
        assert stats.kv_blocks_cached < stats.prefix_cache_hits // 16  # evictions happened


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_speculation_with_prefix_hits_matches_target_alone(drafter: str) -> None:
    """With drafts (a draft model sharing the block tables, or n-grams) and a pool small enough
    to preempt, cached prefixes give the target's exact greedy tokens; the draft model never
    attends to draft KV a hit did not bring (it prefills what it lacks)."""
    draft, target = pair()
    jobs = shared_prefix_jobs(seed=1)
    settings = {"adaptive_speculation": False, "num_speculative_tokens": 4,
                "draft": draft if drafter == "model" else "ngram"}
    results = []
    for blocks in (512, 34):
        engine = make_engine(target, num_kv_blocks=blocks, max_num_batched_tokens=128,
                             **settings)
        results.append(_run(engine, jobs))
        assert engine.stats().prefix_cache_hits > 0 and engine.stats().num_draft_accepted > 0
    reference = {j.request_id: hf_greedy(target, j.prompt_ids, j.max_tokens) for j in jobs}
    assert results == [reference, reference]


@pytest.mark.parametrize("first_drafts", [True, False])
def test_draft_model_proposals_equal_with_cache_on_and_off(first_drafts: bool) -> None:
    """A draft model proposes the same tokens whether a request's prefix is cached or not: a
    second request with the first one's prompt makes as many proposals, accepted as often,
    with the cache on as off. When the first request did not draft (K = 0), the hit blocks
    hold no draft KV, and the draft model prefills them instead of attending to stale slots."""
    draft, target = pair()
    rng = random.Random(5)
    prompt = [rng.randrange(1, 512) for _ in range(90)]
    jobs = [Job("a", prompt, 20, 0), Job("b", prompt + [7, 8, 9], 20, 30)]
    k_first = None if first_drafts else 0
    counts = []
    for enabled in (True, False):
        engine = make_engine(target, draft=draft, num_kv_blocks=256,
                             adaptive_speculation=False, num_speculative_tokens=3,
                             enable_prefix_caching=enabled)
        outputs = run_engine(engine, jobs, lambda job: greedy(
            job.max_tokens, num_speculative_tokens=k_first if job.request_id == "a" else None))
        assert engine.allocator.num_used == 0
        assert (engine.stats().prefix_cache_hits > 0) is enabled
        counts.append((outputs, engine.stats().num_draft_proposed,
                       engine.stats().num_draft_accepted))
    assert counts[0] == counts[1]


def test_seeded_sample_is_the_same_cached_or_not(path: str) -> None:
    """A seeded, sampled request gives the same tokens when its prefix is cached (a second,
    identical request after the first finished) as when nothing is cached."""
    rng = random.Random(2)
    prompt = [rng.randrange(1, 512) for _ in range(75)]
    params = RequestParams(max_tokens=24, sampling=SamplingParams(temperature=0.9, top_p=0.95,
                                                                  seed=123))
    engine = make_engine(path, num_kv_blocks=128)
    first = run_engine(engine, [Job("first", prompt, 24, 0)], lambda job: params)
    second = run_engine(engine, [Job("second", prompt, 24, 0)], lambda job: params)
    assert engine.stats().prefix_cache_hits == 64  # 4 full blocks of the 75-token prompt
    assert first["first"] == second["second"]


def test_cached_tokens_salt_and_opt_out_per_request(path: str) -> None:
    """``num_cached_tokens`` reports the reused prompt tokens (capped at prompt length - 1
    rounded down to blocks); a different ``cache_salt`` or ``prefix_caching=False`` reuses
    nothing, and the outputs stay the same."""
    rng = random.Random(3)
    prompt = [rng.randrange(1, 512) for _ in range(48)]
    engine = make_engine(path, num_kv_blocks=128)
    cached: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    for rid, kw in [("a", {}), ("b", {}), ("salted", {"cache_salt": "tenant-2"}),
                    ("opt-out", {"prefix_caching": False})]:
        engine.add_request(rid, prompt, greedy(5, **kw))
        tokens[rid] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens[rid] += out.new_token_ids
                cached[rid] = out.num_cached_tokens
    assert cached == {"a": 0, "b": 32, "salted": 0, "opt-out": 0}
    assert len({tuple(t) for t in tokens.values()}) == 1
