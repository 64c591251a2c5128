"""Sampling: the shaped distributions, greedy one-hots, and per-request seeded draws."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from scheduler.params import SamplingParams
from scheduler.sampling import draw_uniforms, inverse_cdf, make_generator, sample, shape_probs

VOCAB = 40


def _hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The reference: HF's own warpers, in the order ``generate`` applies them."""
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    if params.min_p > 0.0:
        scores = MinPLogitsWarper(params.min_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def _random_params(gen: torch.Generator) -> SamplingParams:
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=gen, dtype=torch.float64))

    def maybe(value: float, default: float) -> float:
        return value if float(torch.rand(1, generator=gen)) < 0.6 else default

    return SamplingParams(
        temperature=uniform(0.2, 2.5),
        top_k=int(maybe(int(torch.randint(1, VOCAB + 3, (1,), generator=gen)), 0)),
        top_p=maybe(uniform(0.05, 1.0), 1.0),
        min_p=maybe(uniform(0.0, 0.5), 0.0),
    )


def test_filters_match_hf_warpers_in_float64() -> None:
    """temperature -> top-k -> top-p -> min-p gives HF's warped softmax to 1e-12, row by row, for
    random mixes of filters in one vectorised batch."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(60):
        params = [_random_params(gen) for _ in range(8)]
        logits = 3.0 * torch.randn(8, VOCAB, generator=gen, dtype=torch.float64)
        probs = shape_probs(logits, params)
        assert probs.dtype == torch.float64
        for row, p in enumerate(params):
            worst = max(worst, float((probs[row] - _hf_probs(logits[row], p)).abs().max()))
    assert worst < 1e-12


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(top_k=5), SamplingParams(top_p=0.3),
     SamplingParams(min_p=0.2), SamplingParams(temperature=0.7, top_k=8, top_p=0.8, min_p=0.05)],
)
def test_each_filter_alone_matches_hf(params: SamplingParams) -> None:
    """Every filter on its own (and all together) matches the HF reference to 1e-12, and the
    filtered-out tokens get probability exactly 0."""
    logits = 2.0 * torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    probs = shape_probs(logits, [params] * 3)
    for row in range(3):
        ref = _hf_probs(logits[row], params)
        assert torch.allclose(probs[row], ref, rtol=0, atol=1e-12)
        assert torch.equal(probs[row] == 0, ref == 0)
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_top_k_keeps_ties_at_the_threshold() -> None:
    """Tokens tied with the k-th largest logit all survive top-k (HF semantics)."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    probs = shape_probs(logits, [SamplingParams(top_k=2)])
    assert (probs[0] > 0).tolist() == [False, True, True, True, False]


def test_greedy_rows_are_one_hot_at_the_first_argmax() -> None:
    """temperature 0 gives a one-hot at torch.argmax (ties -> lowest index), unaffected by
    top-k/top-p/min-p, while other rows of the batch stay random."""
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [0.5, 2.0, 2.0, -1.0]], dtype=torch.float32)
    probs = shape_probs(logits, [SamplingParams(temperature=0.0, top_k=3, top_p=0.5),
                                 SamplingParams(temperature=1.0)])
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert (probs[1] > 0).all()
    assert probs.dtype == torch.float32


def test_greedy_sampling_returns_the_argmax_for_any_draw() -> None:
    """A one-hot row returns its hot index whatever uniform the generator yields."""
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(2))
    probs = shape_probs(logits, [SamplingParams(temperature=0.0)] * 64)
    generators = [make_generator(seed, "cpu") for seed in range(64)]
    assert torch.equal(sample(probs, generators), logits.argmax(-1))


def test_half_precision_logits_are_shaped_in_float32() -> None:
    """bfloat16 logits give float32 probabilities (float64 stays float64, tested above)."""
    logits = torch.randn(2, VOCAB).to(torch.bfloat16)
    probs = shape_probs(logits, [SamplingParams(top_p=0.9)] * 2)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-6)


def test_mismatched_params_are_rejected() -> None:
    """One SamplingParams per row: a wrong count is a ValueError, not a silent broadcast."""
    with pytest.raises(ValueError):
        shape_probs(torch.zeros(2, VOCAB), [SamplingParams()])
    with pytest.raises(ValueError):
        sample(torch.full((2, VOCAB), 1.0 / VOCAB), [None])


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    """A seeded request draws the same tokens alone, in a batch with other seeded requests, or
    next to unseeded ones at another row: its draws come from its own generator only."""
    probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)), -1)

    def tokens_of_seed_7(layout: list[int | None], steps: int = 20) -> list[int]:
        gens = [make_generator(seed, "cpu") for seed in layout]
        row = layout.index(7)
        return [int(sample(probs.expand(len(layout), -1), gens)[row]) for _ in range(steps)]

    alone = tokens_of_seed_7([7])
    assert tokens_of_seed_7([1, 7, 2]) == alone
    assert tokens_of_seed_7([None, None, 5, 7]) == alone
    assert len(set(alone)) > 1  # really random, not a constant


def test_make_generator() -> None:
    """No seed -> None (shared stream); the same seed -> the same uniforms."""
    assert make_generator(None, "cpu") is None
    a = draw_uniforms([make_generator(11, "cpu")], [5], "cpu")
    b = draw_uniforms([make_generator(11, "cpu")], [5], "cpu")
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < 1)).all()


def test_sampled_frequencies_follow_the_shaped_distribution() -> None:
    """20,000 rows, each with its own seed, drawn from a top-k/top-p shaped distribution:
    chi-square against the distribution passes (p > 0.001) and filtered tokens never appear."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    probs = shape_probs(logits, [SamplingParams(temperature=0.8, top_k=12, top_p=0.9)])[0]
    n = 20_000
    tokens = sample(probs.expand(n, -1), [make_generator(seed, "cpu") for seed in range(n)])
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    result = stats.chisquare(counts[support].numpy(), (n * probs[support]).numpy())
    assert result.pvalue > 0.001


def test_unseeded_rows_use_the_default_generator() -> None:
    """Rows without a generator draw from ``default_generator``: the same default seed gives
    the same tokens."""
    probs = torch.full((16, VOCAB), 1.0 / VOCAB)
    first = sample(probs, [None] * 16, torch.Generator().manual_seed(9))
    second = sample(probs, [None] * 16, torch.Generator().manual_seed(9))
    assert torch.equal(first, second)


def test_minus_infinity_logits_stay_impossible() -> None:
    """Logits padded with -inf (a draft model with a smaller vocabulary) get probability 0 under
    every filter, and the rest still matches HF."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    logits[:, VOCAB - 10:] = float("-inf")
    params = [SamplingParams(), SamplingParams(top_k=VOCAB), SamplingParams(top_p=0.95),
              SamplingParams(min_p=0.01, temperature=1.5)]
    probs = shape_probs(logits, params)
    assert (probs[:, VOCAB - 10:] == 0).all()
    for row, p in enumerate(params):
        assert torch.allclose(probs[row], _hf_probs(logits[row], p), rtol=0, atol=1e-12)


def test_inverse_cdf_never_picks_a_zero_probability_token() -> None:
    """Uniforms at 0 and at the very top of [0, 1) (and 1.0 itself, where u * total rounds to the
    total) land on tokens with non-zero probability: the first and the last of the support."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 3, dtype=torch.float64)
    uniforms = torch.tensor([0.0, 1.0 - 2**-53, 1.0], dtype=torch.float64)
    assert inverse_cdf(probs, uniforms).tolist() == [1, 3, 3]
