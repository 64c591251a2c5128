"""Drafters: who proposes the K tokens per sequence that the target then verifies.

- ``NgramDrafter``: model-free prompt lookup; proposals are deterministic (q is one-hot).
- ``ModelDrafter``: a small model with the target's tokenizer, its KV in the same paged blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from kvpool.kv_cache import KVCacheSpec
from scheduler.ngram import propose_ngram
from scheduler.scheduler import ScheduledSeq, StepPlan


class DraftPass(NamedTuple):
    """One batched forward of a draft model, as adaptive K learns its cost."""

    num_seqs: int
    num_tokens: int  # tokens fed: 1 per sequence, more where the draft catches up
    seconds: float


@dataclass(slots=True)
class Drafts:
    """What one ``propose`` returns beside the draft tokens it wrote into the plan."""

    # q of each drafting sequence's drafts [k, vocab] by request id; None: the proposals are
    # one-hot (deterministic, as n-grams are)
    probs: dict[str, torch.Tensor] | None = None
    passes: list[DraftPass] = field(default_factory=list)  # none for a drafter without a model

    def stacked_probs(self, items: list[ScheduledSeq], max_k: int, vocab: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """q for each of ``items``' proposed tokens ``[B, max_k, vocab]`` (zero-padded)."""
        if self.probs is None:
            return None
        q = torch.zeros(len(items), max_k, vocab, dtype=dtype, device=device)
        for i, item in enumerate(items):
            probs = self.probs.get(item.seq.request_id)
            if probs is not None:
                q[i, : probs.shape[0]] = probs.to(dtype)
        return q


class Drafter(Protocol):
    kv_spec: KVCacheSpec | None  # None: the drafter keeps no KV
    relative_cost: float  # one draft step's time / one target step's time (c in the theory)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None: ...

    def propose(self, plan: StepPlan) -> Drafts:
        """Fill ``draft_token_ids`` (at most ``num_draft_slots``) of each scheduled sequence."""
        ...


class NgramDrafter:
    """Prompt-lookup decoding: continue the longest earlier match of the sequence's last n-gram."""

    def __init__(self, max_ngram: int = 4) -> None:
        self.max_ngram = max_ngram
        self.kv_spec: KVCacheSpec | None = None
        self.relative_cost = 0.0  # lookups are not model passes: cost ~0

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        pass  # nothing to store: proposals come from the token ids alone

    def propose(self, plan: StepPlan) -> Drafts:
        for item in plan.scheduled:
            if item.num_draft_slots:
                item.draft_token_ids = propose_ngram(item.seq.token_ids, item.num_draft_slots,
                                                     self.max_ngram)
        return Drafts()

