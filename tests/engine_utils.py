"""Helpers shared by engine tests: a seeded mixed workload and HF reference outputs."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from scheduler.params import RequestParams, SamplingParams


@dataclass(frozen=True)
class Job:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_step: int


def mixed_jobs(n: int = 18, seed: int = 0, vocab: int = 512, max_prompt: int = 200,
               max_tokens: int = 100) -> list[Job]:
    """Prompts of 3..max_prompt tokens, 1..max_tokens new tokens, arriving over the first steps."""
    rng = random.Random(seed)
    lengths = [3, max_prompt, 1 + max_prompt // 2] + [rng.randint(3, max_prompt) for _ in range(n)]
    budgets = [1, max_tokens] + [rng.randint(1, max_tokens) for _ in range(n)]
    return [Job(f"r{i}", [rng.randrange(1, vocab) for _ in range(lengths[i])], budgets[i],
                rng.randint(0, 12)) for i in range(n)]


def greedy(max_tokens: int, **kw: object) -> RequestParams:
    return RequestParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), **kw)


@functools.cache
def _dense(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                attn_implementation="sdpa").eval()


def hf_greedy(path: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """HF ``generate`` of one request alone (float64), cut after its first EOS."""
    return model_greedy(_dense(path), prompt_ids, max_tokens)


def model_greedy(model: torch.nn.Module, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """``model.generate`` of one request alone, greedy, cut after its first EOS as Helix stops
    there."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def run_engine(engine: Engine, jobs: list[Job], params_of=None,  # noqa: ANN001
               max_steps: int = 10_000) -> dict[str, list[int]]:
    """Feed jobs at their arrival steps, step until done; return each request's output ids."""
    outputs: dict[str, list[int]] = {j.request_id: [] for j in jobs}
    done: set[str] = set()
    params_of = params_of or (lambda job: greedy(job.max_tokens))
    for step in range(max_steps):
        for job in jobs:
            if job.arrival_step == step:
                engine.add_request(job.request_id, job.prompt_ids, params_of(job))
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                done.add(out.request_id)
        engine.check_integrity()
        if len(done) == len(jobs):
            return outputs
    raise AssertionError(f"not finished after {max_steps} steps: {set(outputs) - done}")


def make_engine(path: str, **overrides: object) -> Engine:
    settings: dict[str, object] = {"device": "cpu", "dtype": "float64", **overrides}
    config = EngineConfig(model=path, **settings)  # type: ignore[arg-type]
    return Engine.from_config(config)
