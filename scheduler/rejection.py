"""Lossless speculative acceptance (Leviathan et al. 2022; Chen et al. 2023), batched.

Draft token x_j (proposed with probability q_j(x_j)) is kept with probability min(1, p_j / q_j);
at the first rejection the replacement comes from norm(max(0, p_j - q_j)); when every draft of a
row is kept, a bonus token comes from p at the next position. Each emitted token then follows p
exactly, whatever q was. Greedy rows (p one-hot) therefore keep drafts exactly while they equal the
argmax and emit the argmax at the first mismatch.

Row b uses ``num_drafts[b] + 1`` uniforms from its own generator, in a fixed order (one per draft,
then one for the final token), so its result does not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scheduler.sampling import draw_uniforms, inverse_cdf


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or reject each row's drafts; returns ``(tokens [B, K+1], num_accepted [B])``.

    ``target_probs`` ``[B, K+1, V]``: p at each draft position plus the bonus position.
    ``draft_probs`` ``[B, K, V]``: q of each draft, or None for deterministic proposals (q is
    then a one-hot at the draft token, as for n-gram lookup). ``draft_tokens`` ``[B, K]`` and
    ``num_drafts`` ``[B]`` (ragged rows, padded). ``tokens[b, :num_accepted[b] + 1]`` is row b's
    output (kept drafts and one corrected or bonus token); the rest is -1.
    """
    counts = [int(n) + 1 for n in num_drafts.tolist()]
    uniforms = draw_uniforms(generators, counts, target_probs.device, default_generator)
    return accept_with_uniforms(target_probs, draft_probs, draft_tokens, num_drafts, uniforms)


def accept_with_uniforms(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rejection_sample`` with its randomness given: ``uniforms`` ``[B, >= K+1]`` in [0, 1),
    row b uses ``uniforms[b, j]`` to accept draft j and ``uniforms[b, num_drafts[b]]`` for the
    corrected or bonus token."""
    batch, k_max = draft_tokens.shape
    if target_probs.shape[:2] != (batch, k_max + 1):
        raise ValueError(f"target_probs {tuple(target_probs.shape)} does not fit "
                         f"{batch} rows of {k_max} drafts (want [B, K+1, V])")
    device = target_probs.device
    num_drafts = num_drafts.to(device=device, dtype=torch.long)
    # padding may be -1; any valid index works there since padded positions are masked out
    draft_tokens = draft_tokens.to(device=device, dtype=torch.long).clamp_min(0)
    uniforms = uniforms.to(device=device, dtype=torch.float64)
    if uniforms.shape[1] < k_max + 1:  # rows with fewer drafts than K need no more draws
        uniforms = torch.nn.functional.pad(uniforms, (0, k_max + 1 - uniforms.shape[1]))
    rows = torch.arange(batch, device=device)
    positions = torch.arange(k_max, device=device)

    num_accepted = _count_accepted(target_probs, draft_probs, draft_tokens, num_drafts, uniforms)
    final = _final_distribution(target_probs, draft_probs, draft_tokens, num_drafts, num_accepted)
    final_token = inverse_cdf(final, uniforms[rows, num_drafts])

    tokens = torch.full((batch, k_max + 1), -1, dtype=torch.long, device=device)
    tokens[:, :k_max] = torch.where(positions < num_accepted[:, None], draft_tokens, -1)
    tokens[rows, num_accepted] = final_token
    return tokens, num_accepted


def _count_accepted(target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                    draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                    uniforms: torch.Tensor) -> torch.Tensor:
    """Length of each row's run of accepted drafts (stops at the first rejection)."""
    batch, k_max = draft_tokens.shape
    if k_max == 0:
        return torch.zeros(batch, dtype=torch.long, device=draft_tokens.device)
    index = draft_tokens.unsqueeze(-1)
    p = target_probs[:, :k_max].gather(-1, index).squeeze(-1).to(torch.float64)
    if draft_probs is None:
        ratio = p  # q(x) = 1 for a deterministic proposal
    else:
        q = draft_probs.gather(-1, index).squeeze(-1).to(torch.float64)
        # q(x) = 0 cannot be proposed by a sampler; treat it as "p wins" rather than divide by 0
        ratio = torch.where(q > 0, p / q.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    # P(u < r) = r for u uniform in [0, 1): ratio >= 1 always accepts, ratio 0 never does
    accepted = uniforms[:, :k_max] < ratio
    accepted &= torch.arange(k_max, device=accepted.device) < num_drafts[:, None]
    return accepted.to(torch.long).cumprod(dim=-1).sum(dim=-1)


def _final_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                        draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                        num_accepted: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` (unnormalised) distribution of the token after the accepted run: the residual
    max(0, p - q) after a rejection, p itself for the bonus token."""
    batch, k_max = draft_tokens.shape
    rows = torch.arange(batch, device=target_probs.device)
    p = target_probs[rows, num_accepted]
    if k_max == 0:
        return p
    at = num_accepted.clamp_max(k_max - 1)
    if draft_probs is None:
        q = torch.zeros_like(p).scatter_(1, draft_tokens[rows, at][:, None], 1.0)
    else:
        q = draft_probs[rows, at].to(p.dtype)
    residual = (p - q).clamp_min(0.0)
    rejected = num_accepted < num_drafts
    # max(0, p - q) sums to 0 only when p == q, where rejection cannot happen: fall back to p
    usable = rejected & (residual.sum(dim=-1) > 0)
    return torch.where(usable[:, None], residual, p)


def accept_greedy(argmax: Sequence[int], drafts: Sequence[Sequence[int]]) -> list[list[int]]:
    """``rejection_sample`` for rows whose p is one-hot at the argmax (greedy requests).

    p(x)/q(x) is then >= 1 for the argmax and 0 for any other token, and the residual after a
    rejection is the argmax again, so each row keeps its drafts while they equal the argmax and
    then emits the argmax: no probabilities and no uniforms are needed. ``argmax`` holds, row
    after row, ``len(drafts[b]) + 1`` target argmaxes for row b (draft positions, then bonus).
    """
    out, start = [], 0
    for row in drafts:
        targets = argmax[start: start + len(row) + 1]
        kept = 0
        while kept < len(row) and row[kept] == targets[kept]:
            kept += 1
        out.append([*row[:kept], targets[kept]])
        start += len(row) + 1
    return out
