"""Real chat prompts for benchmarks on a real model (``--model``): a mixed chat workload, and a
copy-heavy task (proofreading a paragraph) where prompt-lookup drafts are accepted.

Prompts are rendered with the model's own chat template, as the daemon renders ``messages``.
"""

from __future__ import annotations

import random
from typing import Any

from bench.common import BenchRequest, WorkloadSpec

SYSTEM_PROMPTS = (
    None,
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a patient teacher who explains things step by step to a curious student.",
)
QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a CPU cache is.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Name three planets of the solar system and one fact about each.",
    "What does a queue do in a computer program?",
    "Suggest a name for a friendly robot and explain your choice.",
    "How do I boil an egg?",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Explain photosynthesis to a ten-year-old.",
    "List five fruits that are rich in vitamin C.",
    "What is the difference between weather and climate?",
    "Write a polite email declining a meeting invitation.",
    "How does a bicycle stay upright?",
)
PARAGRAPHS = (
    "The harbour was quiet that mornign. Fishing boats rocked gently at their moorings, and a "
    "single gull watched the water from the top of a woden post. Further along the quay, an old "
    "man mended his nets while the tide came slowly in.",
    "Our team meets evrey Monday at nine. We reveiw last week's work, agree on the goals for the "
    "next days, and end the meeting with a short demo of somthing new. Notes are shared in the "
    "team channel the same afternoon.",
    "The library opens at eight and closes at six. Visitors may borow up to five books for three "
    "weeks, and the reading room on the frist floor is always free to use. Children's story time "
    "is on Saturday mornings.",
    "To make the soup, fry one onion in buter, add four potatoes and a litre of stock, simmer for "
    "twenty minutes, then blend everything until it is smoth. Season with salt and pepper and "
    "serve it with fresh bread.",
)


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The daemon's rendering: the chat template with the generation prompt (no second BOS)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 / 4


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    """A system prompt (or none), sometimes an earlier turn, and a question or a proofreading
    task: prompts of about 20 to 150 tokens."""
    messages = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system:
        messages.append({"role": "system", "content": system})
    if rng.random() < 0.25:
        messages += [{"role": "user", "content": rng.choice(QUESTIONS)},
                     {"role": "assistant", "content": "Sure, here is a short answer."}]
    content = proofread(rng.choice(PARAGRAPHS)) if rng.random() < 0.2 else rng.choice(QUESTIONS)
    messages.append({"role": "user", "content": content})
    return messages


def proofread(paragraph: str) -> str:
    return f"Correct the spelling in this text and write it out in full:\n\n{paragraph}"


def chat_workload(spec: WorkloadSpec, tokenizer: Any) -> list[BenchRequest]:
    """Seeded mixed chat requests, ``max_tokens`` uniform in the spec's range, Poisson arrivals
    (``spec.prompt_len`` is unused: a prompt is as long as its conversation)."""
    rng = random.Random(spec.seed)
    requests, clock = [], 0.0
    for i in range(spec.num_requests):
        prompt = render(tokenizer, _conversation(rng))
        requests.append(BenchRequest(f"chat{i:03d}", prompt, rng.randint(*spec.max_tokens),
                                     clock))
        clock += rng.expovariate(spec.rate)
    return requests


def copy_prompts(tokenizer: Any, num: int) -> list[list[int]]:
    """``num`` proofreading requests (the paragraphs in turn): most of each answer is already in
    its prompt."""
    return [render(tokenizer, [{"role": "user", "content": proofread(PARAGRAPHS[i % 4])}])
            for i in range(num)]
