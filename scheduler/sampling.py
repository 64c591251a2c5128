"""From logits to the exact distribution each request samples from, and draws from it.

Filter order, as HF ``generate`` applies its warpers: temperature -> top-k -> top-p -> min-p. Each
filter sets removed logits to -inf and the next one sees the renormalised survivors. (vLLM applies
min-p before top-k/top-p; the results differ only when both min-p and top-k/top-p cut.)
Greedy rows (temperature 0) become a one-hot at ``argmax`` (ties -> lowest index), so the same
sampling and rejection code serves greedy and random requests alike.

Draws use inverse-CDF sampling with one uniform per row from that row's own generator, so a
seeded request's tokens depend on its seed and its own history, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scheduler.params import SamplingParams


def sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exactness tests); anything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution ``[N, V]`` each row of ``logits`` ``[N, V]`` samples from under its params.

    Rows sum to 1; filtered tokens have probability exactly 0.
    """
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(params)} params")
    logits = logits.to(sampling_dtype(logits.dtype))
    device, dtype = logits.device, logits.dtype
    greedy_rows = [p.is_greedy for p in params]
    one_hot = None
    if any(greedy_rows):
        one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        if all(greedy_rows):
            return one_hot
    temperature = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params],
                               dtype=dtype, device=device)
    scaled = logits / temperature[:, None]
    if any(_filters(p) for p in params):
        probs = _filtered_probs(scaled, params)
    else:
        probs = torch.softmax(scaled, dim=-1)
    if one_hot is not None:
        greedy = torch.tensor(greedy_rows, device=device)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _filters(p: SamplingParams) -> bool:
    return not p.is_greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def _filtered_probs(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k, top-p, then min-p; each removes logits (-inf) and the next sees the survivors."""
    device, dtype = scaled.device, scaled.dtype
    vocab = scaled.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab and not p.is_greedy else 0 for p in params]
    top_p = torch.tensor([1.0 if p.is_greedy else p.top_p for p in params], dtype=dtype,
                         device=device)
    min_p = [0.0 if p.is_greedy else p.min_p for p in params]
    masked = scaled
    if any(top_k):
        masked = _top_k(masked, torch.tensor(top_k, device=device))
    if bool((top_p < 1.0).any()):
        masked = _top_p(masked, top_p)
    if any(min_p):
        probs = torch.softmax(masked, dim=-1)
        # drop tokens below min_p times the most likely token's (renormalised) probability
        threshold = torch.tensor(min_p, dtype=dtype, device=device)[:, None] * probs.amax(-1, True)
        masked = masked.masked_fill(probs < threshold, float("-inf"))
    return torch.softmax(masked, dim=-1)


def _top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep logits >= each row's k-th largest (ties at the threshold stay, as in HF); k=0 keeps
    everything. topk of the largest k is far cheaper than sorting the vocabulary."""
    values = logits.topk(int(top_k.max()), dim=-1).values
    kth = values.gather(1, (top_k - 1).clamp_min(0)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Drop a token when the probability mass strictly above it already reaches top_p (the most
    likely token always stays): HF's "ascending cumsum <= 1 - top_p" rule, seen from the top."""
    active = top_p < 1.0
    # only surviving tokens of the rows that use top-p need ordering: after a top-k that is a
    # short topk instead of a sort of the whole vocabulary
    survivors = int((logits[active] > float("-inf")).sum(-1).max())
    ordered, order = logits.topk(max(survivors, 1), dim=-1)
    probs = torch.softmax(ordered, dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop = (mass_above >= top_p[:, None]) & active[:, None]
    drop_full = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, drop)
    return logits.masked_fill(drop_full, float("-inf"))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded request; None (shared default stream) when unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def draw_uniforms(generators: Sequence[torch.Generator | None], counts: Sequence[int],
                  device: torch.device | str,
                  default_generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, max(counts)]`` float64 uniforms in [0, 1): row i takes ``counts[i]`` draws, in order,
    from ``generators[i]`` (padding is 0).

    Rows without a generator share ``default_generator`` (or torch's global one) in one draw.
    """
    width = max(counts, default=0)
    out = torch.zeros(len(counts), width, dtype=torch.float64, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    for i, (gen, count) in enumerate(zip(generators, counts)):
        if gen is not None and count:
            # drawn on the generator's own device (its stream is device-specific); no host sync
            # when that is the sampling device
            out[i, :count] = torch.rand(count, generator=gen, dtype=torch.float64,
                                        device=gen.device).to(device)
    total = sum(counts[i] for i in unseeded)
    if total:
        gen_device = default_generator.device if default_generator is not None else "cpu"
        shared = torch.rand(total, generator=default_generator, dtype=torch.float64,
                            device=gen_device).to(device)
        start = 0
        for i in unseeded:
            out[i, : counts[i]] = shared[start: start + counts[i]]
            start += counts[i]
    return out


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token index per row: the first index whose cumulative probability exceeds ``u * total``.

    Zero-probability tokens are never chosen; a one-hot row always yields its hot index.
    """
    cdf = probs.cumsum(dim=-1)
    # scaling by the row total makes unnormalised rows (rejection residuals) work directly
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).clamp_max(probs.shape[-1] - 1)
    overflow = cdf.gather(1, index) <= target
    # u * total can round up to total (past the end): take the last token with non-zero
    # probability. Rare, so the full-row scan runs only then (the tokens go to the host anyway)
    if bool(overflow.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1, True)
        index = torch.where(overflow, last, index)
    return index.squeeze(-1)


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` ``[N, V]`` (long ``[N]``), one uniform from each row's
    generator (None: ``default_generator`` or torch's global one)."""
    if probs.shape[0] != len(generators):
        raise ValueError(f"{probs.shape[0]} rows but {len(generators)} generators")
    if not generators:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    uniforms = draw_uniforms(generators, [1] * len(generators), probs.device, default_generator)
    return inverse_cdf(probs, uniforms[:, 0])
