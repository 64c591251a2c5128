"""Greedy exactness on a real trained model: SmolLM2-135M-Instruct (from its GGUF file) through
Helix's engine gives Hugging Face ``generate``'s tokens for 8 chat conversations, one at a time
and all in one continuous batch, plain and with the n-gram drafter.

A random model's near-uniform logits rarely tell kernels apart by a flipped argmax on text, and
never exercise real chat templates, end-of-turn stops or copy-heavy drafts; this model does.
Runs in float32 (shown identical to HF on this model) on ``HELIX_TEST_DEVICE`` (default cpu; cuda
or mps on an accelerator, where the policy is the same: identical greedy tokens)."""

from __future__ import annotations

from typing import Any

import pytest

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import ResolvedModel
from tests.daemon_harness import one_torch_thread
from tests.engine_utils import Job, run_engine
from tests.smollm2 import device_under_test, hf_greedy

MAX_TOKENS = 32
PARAGRAPH = ("The harbour was quiet that morning. Fishing boats rocked gently at their moorings, "
             "and a single gull watched the water from the top of a wooden post.")
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List three primary colours."}],
    [{"role": "user", "content": "Explain in one sentence what a CPU does."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Name another one."}],
    # copy-heavy: the n-gram drafter's drafts are accepted here
    [{"role": "user", "content": f"Repeat this text exactly:\n\n{PARAGRAPH}"}],
    [{"role": "user", "content": "Rewrite this paragraph, changing 'morning' to 'evening':\n\n"
                                 f"{PARAGRAPH}"}],
]


@pytest.fixture(scope="module")
def reference_model(hf_from_gguf: tuple[Any, Any]) -> tuple[Any, Any]:
    """HF's own load of the .gguf (float32) on the test device."""
    model, tokenizer = hf_from_gguf
    return model.to(device_under_test()), tokenizer


@pytest.fixture(scope="module")
def jobs(reference_model: tuple[Any, Any]) -> list[Job]:
    _, tokenizer = reference_model
    return [Job(f"c{i}", _template_ids(tokenizer, m), MAX_TOKENS, arrival_step=i)
            for i, m in enumerate(CONVERSATIONS)]


@pytest.fixture(scope="module")
def reference(reference_model: tuple[Any, Any], jobs: list[Job]) -> dict[str, list[int]]:
    model, _ = reference_model
    with one_torch_thread():
        expected = {j.request_id: hf_greedy(model, j.prompt_ids, j.max_tokens) for j in jobs}
    model.to("cpu")  # the session's other tests use it on the CPU
    return expected


def _template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 / 4


def _engine(model: ResolvedModel, draft: str) -> Engine:
    # adaptive K off: the test must see the drafter propose on every step, not only when the
    # policy finds it pays
    return Engine.from_config(EngineConfig(
        model=model.path, draft=draft, device=device_under_test(), dtype="float32",
        num_kv_blocks=256, adaptive_speculation=False))


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_one_at_a_time_equals_hf_generate(first_resolve: ResolvedModel, jobs: list[Job],
                                          reference: dict[str, list[int]], draft: str) -> None:
    """Each conversation alone: Helix's greedy tokens are HF ``generate``'s, token for token."""
    engine = _engine(first_resolve, draft)
    with one_torch_thread():
        for job in jobs:
            solo = Job(job.request_id, job.prompt_ids, job.max_tokens, 0)
            assert run_engine(engine, [solo]) == {job.request_id: reference[job.request_id]}
    if draft == "ngram":
        assert engine.stats().num_draft_accepted > 0


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_continuous_batch_equals_hf_generate(first_resolve: ResolvedModel, jobs: list[Job],
                                             reference: dict[str, list[int]], draft: str) -> None:
    """All 8 conversations arriving over 8 steps into one continuous batch (prefill beside
    decode and verify) give each request HF's tokens alone; the pool is whole afterwards."""
    engine = _engine(first_resolve, draft)
    with one_torch_thread():
        assert run_engine(engine, jobs) == reference
    assert engine.allocator.num_free == engine.allocator.num_blocks
    if draft == "ngram":
        assert engine.stats().num_draft_accepted > 0


def test_the_answers_are_real_text(reference_model: tuple[Any, Any],
                                   reference: dict[str, list[int]]) -> None:
    """The reference is a trained model's, not noise: it knows Paris and copies the paragraph."""
    _, tokenizer = reference_model
    assert "Paris" in tokenizer.decode(reference["c0"])
    assert tokenizer.decode(reference["c6"]).startswith(PARAGRAPH[:40])
