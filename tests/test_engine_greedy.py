"""Greedy continuous batching on the paged pool is token-identical to HF ``generate`` alone."""

from __future__ import annotations

import pytest

from scheduler.errors import InvalidRequestError
from scheduler.params import RequestParams, SamplingParams
from tests.engine_utils import greedy, hf_greedy, make_engine, mixed_jobs, run_engine
from tests.tiny import tiny_model

LLAMA = {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 64}


@pytest.fixture(scope="module")
def path() -> str:
    return tiny_model("llama", **LLAMA)


@pytest.fixture(scope="module")
def reference(path: str) -> dict[str, list[int]]:
    return {j.request_id: hf_greedy(path, j.prompt_ids, j.max_tokens) for j in mixed_jobs()}


@pytest.mark.parametrize("name,overrides", [
    ("roomy pool", {"num_kv_blocks": 512, "max_num_batched_tokens": 1024}),
    ("chunked prefill", {"num_kv_blocks": 512, "max_num_batched_tokens": 48}),
    ("preemption", {"num_kv_blocks": 40, "max_num_batched_tokens": 256}),
])
def test_greedy_matches_hf(path: str, reference: dict[str, list[int]], name: str,
                           overrides: dict[str, int]) -> None:
    """18 requests (prompts 3-200, max_tokens 1-100, staggered arrivals) equal HF token for token.

    The small pool forces preemption by recompute; the small token budget forces chunked prefill.
    After every step the pool's integrity holds, and at the end every block is free.
    """
    engine = make_engine(path, **overrides)
    outputs = run_engine(engine, mixed_jobs())
    assert outputs == reference
    stats = engine.stats()
    if name == "preemption":
        assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_gpt2_greedy_matches_hf() -> None:
    """A GPT-2-family model runs on the same pool and also matches HF exactly."""
    path = tiny_model("gpt2")
    jobs = mixed_jobs(n=6, seed=3)
    engine = make_engine(path, num_kv_blocks=256, max_num_batched_tokens=64)
    outputs = run_engine(engine, jobs)
    assert outputs == {j.request_id: hf_greedy(path, j.prompt_ids, j.max_tokens) for j in jobs}


def test_kv_pool_is_sized_from_a_byte_budget(path: str) -> None:
    """A budget in bytes buys as many whole blocks as fit, and the engine reports their bytes."""
    budget = 3 * 2**20
    engine = make_engine(path, kv_cache_memory=budget)
    per_block = engine.target.kv_spec.bytes_per_block(engine.config.block_size)
    assert engine.allocator.num_blocks == budget // per_block
    assert budget - per_block < engine.kv_cache_bytes <= budget


@pytest.mark.parametrize("prompt,params,message", [
    ("", greedy(4), "empty"),
    ([1] * 1000, greedy(100), "context"),
    ([1, 2], greedy(0), "max_tokens"),
    ([1, 2], RequestParams(sampling=SamplingParams(temperature=-1.0)), "temperature"),
    ([1, 2], RequestParams(sampling=SamplingParams(top_p=0.0)), "top_p"),
    ([1, 99999], greedy(4), "token ids"),
    ([1] * 200, greedy(200), "never fit"),
])
def test_bad_request_is_refused_and_the_engine_keeps_serving(
        path: str, prompt: object, params: RequestParams, message: str) -> None:
    """Through the real engine: each bad request raises a typed error naming its problem,
    while a good request submitted beside it still runs to its exact HF output."""
    engine = make_engine(path, num_kv_blocks=16)
    good = mixed_jobs(n=1, seed=7, max_prompt=20, max_tokens=8)[0]
    engine.add_request(good.request_id, good.prompt_ids, greedy(good.max_tokens))
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == good.request_id
            tokens += out.new_token_ids
    assert tokens == hf_greedy(path, good.prompt_ids, good.max_tokens)
    assert engine.allocator.num_free == engine.allocator.num_blocks
