"""How many draft tokens (K) each sequence gets this step."""

from __future__ import annotations

from scheduler.sequence import Sequence


class AdaptiveDraftPolicy:
    """Pick K per sequence from its recent acceptance rate.

    Expected tokens from K drafts at acceptance α are (1 - α^(K+1)) / (1 - α); each draft costs
    ``draft_cost`` (one draft step relative to one target step) plus its verify slot. K grows while
    the next draft's expected gain α^(K+1) beats that cost, so a sequence whose drafts keep being
    rejected falls to K = 0 (plain decoding through the same path).
    """

    def __init__(self, adaptive: bool = True, draft_cost: float = 0.0,
                 verify_cost: float = 0.02, prior_acceptance: float = 0.6) -> None:
        self.adaptive = adaptive
        self.draft_cost = draft_cost
        self.verify_cost = verify_cost
        self.prior_acceptance = prior_acceptance

    def __call__(self, seq: Sequence, max_k: int) -> int:
        if not self.adaptive:
            return max_k
        alpha = seq.acceptance_ema if seq.acceptance_ema is not None else self.prior_acceptance
        cost = self.draft_cost + self.verify_cost
        k = 0
        while k < max_k and alpha ** (k + 1) > cost * (1 + k * self.draft_cost):
            k += 1
        return k
