"""Drafters: who proposes the K tokens per sequence that the target then verifies.

- ``NgramDrafter``: model-free prompt lookup; proposals are deterministic (q is one-hot).
- ``ModelDrafter``: a small model with the target's tokenizer, its KV in the same paged blocks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from helix_daemon.engine.model_runner import ModelRunner
from kvpool.kv_cache import KVCacheSpec
from scheduler.ngram import propose_ngram
from scheduler.scheduler import ScheduledSeq, StepPlan


class Drafter(Protocol):
    kv_spec: KVCacheSpec | None  # None: the drafter keeps no KV
    relative_cost: float  # one draft step's time / one target step's time (c in the theory)
    # (sequences, tokens fed, seconds) of each pass of the last step
    pass_timings: list[tuple[int, int, float]]

    def allocate_cache(self, num_blocks: int, block_size: int) -> None: ...

    def propose(self, plan: StepPlan) -> None:
        """Fill ``draft_token_ids`` (at most ``num_draft_slots``) of each scheduled sequence."""

    def draft_probs(self, items: list[ScheduledSeq], max_k: int, vocab: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
        """q for each proposed token ``[B, max_k, vocab]``, or None for one-hot proposals."""


class NgramDrafter:
    """Prompt-lookup decoding: continue the longest earlier match of the sequence's last n-gram."""

    kv_spec = None
    relative_cost = 0.0
    pass_timings: list[tuple[int, int, float]] = []  # lookups are not model passes: cost ~0

    def __init__(self, max_ngram: int = 4) -> None:
        self.max_ngram = max_ngram

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        pass  # nothing to store: proposals come from the token ids alone

    def propose(self, plan: StepPlan) -> None:
        for item in plan.scheduled:
            if item.num_draft_slots:
                item.draft_token_ids = propose_ngram(item.seq.token_ids, item.num_draft_slots,
                                                     self.max_ngram)

    def draft_probs(self, items: list[ScheduledSeq], max_k: int, vocab: int,
                    dtype: torch.dtype) -> torch.Tensor | None:
        return None


def make_drafter(name: str, target: ModelRunner,
                 tokenizer: PreTrainedTokenizerBase) -> Drafter | None:
    if name in ("none", ""):
        return None
    if name == "ngram":
        return NgramDrafter()
    from helix_daemon.engine.model_drafter import ModelDrafter

    return ModelDrafter.load(name, target, tokenizer)
