"""What ``helix demo`` runs: its models, the requests it streams to the terminal and the batch it
sends, for the real chat model (the default) or for tiny random models (``--tiny``)."""

from __future__ import annotations

import argparse
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helix_daemon.cli.batch import BatchItem
from helix_daemon.engine.model_files import bundled_model


@dataclass(frozen=True)
class DemoPlan:
    target: str
    draft: str
    kv_cache_memory: str
    intro: list[dict[str, Any]]  # request bodies streamed token by token before the batch
    items: list[BatchItem]
    readable: bool  # real text is printed as is; a random model's bytes are escaped


def demo_plan(args: argparse.Namespace) -> DemoPlan:
    return tiny_plan(args) if args.tiny else chat_plan(args)


# --- a real chat model ------------------------------------------------------------------------

_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a CPU cache is in two sentences.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Name three planets of the solar system.",
    "What does a queue do in a computer program?",
    "Suggest a name for a friendly robot.",
)
# Copy-heavy tasks: most of the answer is already in the prompt, so n-gram drafts are accepted.
_TYPO_PARAGRAPHS = (
    "The harbour was quiet that mornign. Fishing boats rocked gently at their moorings, and a "
    "single gull watched the water from the top of a woden post.",
    "Our team meets evrey Monday at nine. We reveiw last week's work, agree on the goals for the "
    "next days, and end the meeting with a short demo of somthing new.",
    "The library opens at eight and closes at six. Visitors may borow up to five books for three "
    "weeks, and the reading room on the frist floor is always free to use.",
    "To make the soup, fry one onion in buter, add four potatoes and a litre of stock, simmer for "
    "twenty minutes, then blend everything until it is smoth.",
)


def _chat(content: str, max_tokens: int, **sampling: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            **sampling}


def _proofread(i: int) -> str:
    return ("Correct the spelling in this text and write it out in full:\n\n"
            f"{_TYPO_PARAGRAPHS[i % len(_TYPO_PARAGRAPHS)]}")


def chat_items(n: int, max_tokens: int, seed: int = 0) -> list[BatchItem]:
    """Chat questions (half greedy, half sampled with a seed) and, every third request, a
    paragraph to proofread (greedy)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if i % 3 == 2:
            body = _chat(_proofread(i // 3), max_tokens, temperature=0.0)
        elif i % 2:
            body = _chat(rng.choice(_QUESTIONS), max_tokens, temperature=0.7, top_p=0.9, seed=i)
        else:
            body = _chat(_QUESTIONS[i % len(_QUESTIONS)], max_tokens, temperature=0.0)
        items.append(BatchItem(i + 1, f"demo-{uuid.uuid4().hex[:12]}", body))
    return items


def chat_plan(args: argparse.Namespace) -> DemoPlan:
    if args.draft == "model":
        raise ValueError("--draft model is a tiny draft model: use it with --tiny")
    max_tokens = args.max_tokens or 128
    intro = [_chat(_QUESTIONS[0], max_tokens, temperature=0.0),
             _chat(_QUESTIONS[1], max_tokens, temperature=0.0),
             _chat(_proofread(0), max_tokens, temperature=0.0)]
    return DemoPlan(target=args.model or str(bundled_model()), draft=args.draft,
                    kv_cache_memory=args.kv_cache_memory or str(256 * 2**20), intro=intro,
                    items=chat_items(args.num_requests, max_tokens), readable=True)


# --- tiny random models -----------------------------------------------------------------------

_TINY_PROMPTS = (
    "The quick brown fox", "Once upon a time", "In a paged KV cache, every block",
    "Speculative decoding drafts tokens that", "Redis streams deliver each entry to",
    "def fibonacci(n):", "The capital of France is", "Continuous batching means",
)


def tiny_models(cache_dir: Path, draft: str) -> tuple[str, str]:
    """Build (once, cached) the tiny target and, for ``--draft model``, a tiny draft model."""
    from helix_daemon.testing.tiny_models import build_tiny_model

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


def tiny_items(n: int, max_tokens: int, seed: int = 0) -> list[BatchItem]:
    """A mixed workload: greedy and sampled requests of varied lengths."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        body: dict[str, Any] = {"prompt": _TINY_PROMPTS[i % len(_TINY_PROMPTS)],
                                "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens)}
        if i % 2:
            body.update(temperature=0.8, top_p=0.95, seed=i)
        else:
            body["temperature"] = 0.0
        items.append(BatchItem(i + 1, f"demo-{uuid.uuid4().hex[:12]}", body))
    return items


def tiny_plan(args: argparse.Namespace) -> DemoPlan:
    if args.model:
        raise ValueError("--tiny builds its own random models: leave out --model")
    target, draft = tiny_models(args.cache_dir, args.draft)
    max_tokens = args.max_tokens or 48
    intro = [{"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
             for prompt in _TINY_PROMPTS[:2]]
    return DemoPlan(target=target, draft=draft,
                    kv_cache_memory=args.kv_cache_memory or str(4 * 2**20), intro=intro,
                    items=tiny_items(args.num_requests, max_tokens), readable=False)
