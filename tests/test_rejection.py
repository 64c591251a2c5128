"""Speculative acceptance is lossless: emitted tokens follow the target distribution exactly.

The exact checks enumerate the acceptance tree analytically (accept x with min(1, p/q), else draw
from norm(max(0, p - q)), bonus from p) over a small vocabulary; the code itself is tied to that
rule by probing its thresholds with chosen uniforms, and by sampled chi-square tests.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from scheduler.params import SamplingParams
from scheduler.rejection import accept_greedy, accept_with_uniforms, rejection_sample
from scheduler.sampling import make_generator, sample, shape_probs

V = 6
F64 = torch.float64

PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.25),
    SamplingParams(temperature=0.8, top_k=4, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=0.0),
]


class Tree:
    """Target and draft distributions p(.|h), q(.|h) for every history h up to ``depth`` tokens,
    shaped by ``shape_probs`` from random logits (as the engine does)."""

    def __init__(self, seed: int, p_params: SamplingParams, q_params: SamplingParams | None,
                 depth: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.p = self._table(gen, p_params, depth)
        # q None: a deterministic drafter (one-hot at a history-dependent token, like n-grams)
        self.q = self._table(gen, q_params, depth) if q_params else self._one_hots(gen, depth)

    @staticmethod
    def _table(gen: torch.Generator, params: SamplingParams, depth: int) -> list[torch.Tensor]:
        tables = []
        for d in range(depth + 1):
            logits = 2.0 * torch.randn(V**d, V, generator=gen, dtype=F64)
            tables.append(shape_probs(logits, [params] * V**d).reshape(*[V] * d, V))
        return tables

    @staticmethod
    def _one_hots(gen: torch.Generator, depth: int) -> list[torch.Tensor]:
        tables = []
        for d in range(depth + 1):
            hot = torch.randint(0, V, (V**d, 1), generator=gen)
            tables.append(torch.zeros(V**d, V, dtype=F64).scatter_(1, hot, 1.0)
                          .reshape(*[V] * d, V))
        return tables

    def p_at(self, h: tuple[int, ...]) -> torch.Tensor:
        return self.p[len(h)][h]

    def q_at(self, h: tuple[int, ...]) -> torch.Tensor:
        return self.q[len(h)][h]


def first_token_dist(tree: Tree, h: tuple[int, ...], k: int) -> torch.Tensor:
    """Exact distribution of the first token one step emits at history h with k drafts."""
    if k == 0:
        return tree.p_at(h)  # the bonus token
    p, q = tree.p_at(h), tree.q_at(h)
    accept = torch.where(q > 0, torch.clamp(p / q, max=1.0), 0.0)
    kept = q * accept  # proposed x and kept
    out = kept.clone()
    reject_mass = float((q * (1 - accept)).sum())
    if reject_mass > 0:
        residual = (p - q).clamp_min(0)
        out += reject_mass * residual / residual.sum()
    return out


def first_two_dist(tree: Tree, h: tuple[int, ...], k: int) -> torch.Tensor:
    """Exact joint distribution ``[V, V]`` of the first two emitted tokens with k drafts per step:
    after a kept draft the same step continues with k-1 drafts; after a rejection (or bonus) the
    next step starts fresh at the new history with k drafts."""
    p, q = tree.p_at(h), tree.q_at(h)
    joint = torch.zeros(V, V, dtype=F64)
    if k == 0:
        for x in range(V):
            joint[x] = p[x] * first_token_dist(tree, (*h, x), 0)
        return joint
    accept = torch.where(q > 0, torch.clamp(p / q, max=1.0), 0.0)
    reject_mass = float((q * (1 - accept)).sum())
    residual = (p - q).clamp_min(0)
    for x in range(V):
        # x kept as a draft: the step goes on; x as the correction: the next step emits the 2nd
        joint[x] += q[x] * accept[x] * first_token_dist(tree, (*h, x), k - 1)
        if reject_mass > 0:
            joint[x] += reject_mass * residual[x] / residual.sum() * first_token_dist(
                tree, (*h, x), k)
    return joint


CASES = [(seed, PARAMS[seed % len(PARAMS)], PARAMS[(seed * 3 + 1) % len(PARAMS)], k)
         for seed in range(10) for k in (1, 2, 3)]


@pytest.mark.parametrize(("seed", "p_params", "q_params", "k"), CASES)
def test_exact_first_tokens_follow_p(seed: int, p_params: SamplingParams,
                                     q_params: SamplingParams, k: int) -> None:
    """Enumerated over the acceptance tree, the first emitted token is distributed as p and the
    first two as p(x) p(y|x), within 1e-9, for p and q shaped by temperature/top-k/top-p/min-p
    (greedy included), for a sampled draft and for a deterministic (one-hot) draft."""
    for q in (q_params, None):
        tree = Tree(seed, p_params, q)
        p0 = tree.p_at(())
        assert torch.allclose(first_token_dist(tree, (), k), p0, rtol=0, atol=1e-9)
        expected = p0[:, None] * tree.p[1]
        assert torch.allclose(first_two_dist(tree, (), k), expected, rtol=0, atol=1e-9)


def test_code_acceptance_thresholds_follow_the_rule() -> None:
    """The code accepts draft x exactly when u < min(1, p(x)/q(x)), draws the correction from
    norm(max(0, p - q)) and the bonus from p: probed with uniforms just inside and outside each
    threshold, and at the middle of each token's inverse-CDF interval."""
    gen = torch.Generator().manual_seed(5)
    batch = 200
    p = torch.softmax(2 * torch.randn(batch, 2, V, generator=gen, dtype=F64), -1)
    q = torch.softmax(2 * torch.randn(batch, 1, V, generator=gen, dtype=F64), -1)
    drafts = torch.randint(0, V, (batch, 1), generator=gen)
    rows = torch.arange(batch)
    ratio = (p[rows, 0, drafts[:, 0]] / q[rows, 0, drafts[:, 0]]).clamp(max=1.0)
    num_drafts = torch.ones(batch, dtype=torch.long)
    # final token by the middle of a random token's interval in the (unnormalised) target cdf
    def uniform_for(dist: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        dist = dist / dist.sum(-1, keepdim=True)
        cdf = dist.cumsum(-1)
        return (cdf[rows, token] - dist[rows, token] / 2)

    residual = (p[:, 0] - q[:, 0]).clamp_min(0)
    want_fix = torch.multinomial(residual, 1, generator=gen)[:, 0]
    want_bonus = torch.multinomial(p[:, 1], 1, generator=gen)[:, 0]
    eps = 1e-9
    below = torch.stack([(ratio - eps).clamp_min(0), uniform_for(p[:, 1], want_bonus)], -1)
    tokens, accepted = accept_with_uniforms(p, q, drafts, num_drafts, below)
    can_accept = ratio > eps
    assert torch.equal(accepted.bool(), can_accept)
    assert torch.equal(tokens[can_accept, 1], want_bonus[can_accept])
    above = torch.stack([(ratio + eps).clamp_max(1 - 1e-12),
                         uniform_for(residual, want_fix)], -1)
    tokens, accepted = accept_with_uniforms(p, q, drafts, num_drafts, above)
    can_reject = ratio < 1 - eps
    assert not accepted[can_reject].any()
    assert torch.equal(tokens[can_reject, 0], want_fix[can_reject])
    assert (tokens[can_reject, 1] == -1).all()


def test_zero_residual_falls_back_to_p() -> None:
    """If rounding makes q >= p everywhere, a rejection finds max(0, p - q) == 0 and draws from
    p instead (a valid token of p, never garbage)."""
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [1 / 6] * 6]], dtype=F64)
    q = p[:, :1] * (1 + 1e-12)
    uniforms = torch.tensor([[1 - 1e-15, 0.5]], dtype=F64)
    tokens, accepted = accept_with_uniforms(p, q, torch.tensor([[1]]), torch.tensor([1]),
                                            uniforms)
    assert int(accepted[0]) == 0
    assert int(tokens[0, 0]) == 2  # cdf of p: 0.1, 0.3, 0.6: u = 0.5 falls on token 2


def _greedy_probs(logits: torch.Tensor) -> torch.Tensor:
    rows = logits.reshape(-1, logits.shape[-1])
    probs = shape_probs(rows, [SamplingParams(temperature=0.0)] * rows.shape[0])
    return probs.reshape(logits.shape)


@pytest.mark.parametrize("with_q", [False, True])
def test_greedy_rows_accept_exactly_while_draft_is_argmax(with_q: bool) -> None:
    """With one-hot p, drafts are kept exactly while they equal the argmax; the first mismatch
    is replaced by the argmax; a fully accepted row gets the argmax bonus; ragged rows pad -1.
    ``accept_greedy`` (the engine's all-greedy shortcut) returns exactly the same rows."""
    gen = torch.Generator().manual_seed(6)
    batch, k = 64, 4
    logits = torch.randn(batch, k + 1, V, generator=gen, dtype=F64)
    target = _greedy_probs(logits)
    argmax = logits.argmax(-1)
    # drafts agree with the argmax for a random-length run, then may disagree
    agree = torch.rand(batch, k, generator=gen) < 0.75
    drafts = torch.where(agree, argmax[:, :k], torch.randint(0, V, (batch, k), generator=gen))
    num_drafts = torch.randint(0, k + 1, (batch,), generator=gen)
    q = torch.softmax(torch.randn(batch, k, V, generator=gen, dtype=F64), -1) if with_q else None
    tokens, accepted = rejection_sample(target, q, drafts, num_drafts,
                                        [make_generator(i, "cpu") for i in range(batch)])
    for b in range(batch):
        n = int(num_drafts[b])
        run = 0
        while run < n and drafts[b, run] == argmax[b, run]:
            run += 1
        assert int(accepted[b]) == run
        assert tokens[b, :run].tolist() == drafts[b, :run].tolist()
        assert int(tokens[b, run]) == int(argmax[b, run])
        assert (tokens[b, run + 1:] == -1).all()
    # the engine's shortcut for all-greedy steps gives the very same rows
    lengths = num_drafts.tolist()
    fast = accept_greedy([t for b in range(batch) for t in argmax[b, :lengths[b] + 1].tolist()],
                         [drafts[b, :lengths[b]].tolist() for b in range(batch)])
    assert fast == [tokens[b, :int(accepted[b]) + 1].tolist() for b in range(batch)]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    """A seeded row gets the same tokens alone, or padded to a larger K inside a batch with other
    seeded and unseeded rows: its uniforms come from its own generator in a fixed order."""
    gen = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(1, 3, V, generator=gen, dtype=F64), -1)
    q = torch.softmax(torch.randn(1, 2, V, generator=gen, dtype=F64), -1)
    drafts = torch.randint(0, V, (1, 2), generator=gen)
    alone = [rejection_sample(p, q, drafts, torch.tensor([2]), [make_generator(s, "cpu")])
             for s in range(30)]
    k = 5
    p_big = torch.softmax(torch.randn(3, k + 1, V, generator=gen, dtype=F64), -1)
    q_big = torch.softmax(torch.randn(3, k, V, generator=gen, dtype=F64), -1)
    d_big = torch.randint(0, V, (3, k), generator=gen)
    p_big[1, :3], q_big[1, :2], d_big[1, :2] = p[0], q[0], drafts[0]
    for s in range(30):
        tokens, accepted = rejection_sample(p_big, q_big, d_big, torch.tensor([5, 2, 3]),
                                            [None, make_generator(s, "cpu"),
                                             make_generator(100 + s, "cpu")])
        n = int(accepted[1])
        assert n == int(alone[s][1][0])
        assert tokens[1, : n + 1].tolist() == alone[s][0][0, : n + 1].tolist()
    assert len({int(a[1][0]) for a in alone}) > 1  # the runs really vary


def _draw(table: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    return sample(table, gens)


def test_sampled_first_two_tokens_follow_p() -> None:
    """20,000 seeded rows with K=2 drafts sampled from q: the joint frequency of the first two
    emitted tokens (a second step runs where only one was emitted) passes chi-square against
    p(x) p(y|x) (p > 0.001); likewise the first token against p."""
    tree = Tree(8, SamplingParams(temperature=0.9, top_k=5), SamplingParams(top_p=0.8))
    n = 20_000
    gens = [make_generator(s, "cpu") for s in range(n)]
    first, second = _one_step(tree, (torch.zeros(n, 0, dtype=torch.long)), gens)
    redo = second < 0
    if redo.any():
        more, _ = _one_step(tree, first[redo, None], [g for g, r in zip(gens, redo) if r])
        second[redo] = more
    p0 = tree.p_at(())
    counts = torch.bincount(first, minlength=V).double()
    support = p0 > 0
    assert counts[~support].sum() == 0
    assert stats.chisquare(counts[support].numpy(), (n * p0[support]).numpy()).pvalue > 0.001
    joint = p0[:, None] * tree.p[1]
    pairs = torch.bincount(first * V + second, minlength=V * V).double().reshape(V, V)
    mask = joint > 0
    assert pairs[~mask].sum() == 0
    assert stats.chisquare(pairs[mask].numpy(), (n * joint[mask]).numpy()).pvalue > 0.001


def _one_step(tree: Tree, history: torch.Tensor,
              gens: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative step with K=2 drafts drawn from q at each row's history (length 0 or 1):
    returns the first and second emitted tokens (-1 where only one was emitted)."""
    def lookup(tables: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return tables[h.shape[1]][tuple(h.T)] if h.shape[1] else tables[0].expand(len(h), -1)

    x0 = _draw(lookup(tree.q, history), gens)
    h1 = torch.cat([history, x0[:, None]], 1)
    x1 = _draw(lookup(tree.q, h1), gens)
    h2 = torch.cat([h1, x1[:, None]], 1)
    target = torch.stack([lookup(tree.p, history), lookup(tree.p, h1), lookup(tree.p, h2)], 1)
    q = torch.stack([lookup(tree.q, history), lookup(tree.q, h1)], 1)
    tokens, _ = rejection_sample(target, q, torch.stack([x0, x1], 1),
                                 torch.full((len(gens),), 2), gens)
    return tokens[:, 0], tokens[:, 1]
