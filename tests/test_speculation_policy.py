"""Adaptive K: the policy picks the draft length that maximises expected tokens per second."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from kvpool.allocator import BlockAllocator
from scheduler.params import RequestParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.sequence import Sequence
from scheduler.speculation import (
    AcceptanceCounts,
    AdaptiveDraftPolicy,
    DraftingRecord,
    StepCostModel,
    estimated_acceptance,
)


def _seq(name: str) -> Sequence:
    """A sequence the policy knows nothing of yet (its prior rules)."""
    return Sequence(name, [1, 2, 3], RequestParams(max_tokens=64), arrival=0)


def _evidence(policy: AdaptiveDraftPolicy, seqs: Iterable[Sequence],
              acceptance: float) -> list[Sequence]:
    """Give ``policy`` long evidence that each of ``seqs`` has ``acceptance``; return them."""
    for seq in seqs:
        policy.by_request[seq.request_id] = AcceptanceCounts(accepted=1e4 * acceptance,
                                                             judged=1e4)
    return list(seqs)


def _known(policy: AdaptiveDraftPolicy, name: str, acceptance: float) -> Sequence:
    """A sequence with long evidence of ``acceptance`` in ``policy``."""
    return _evidence(policy, [_seq(name)], acceptance)[0]


def _policy(step_ms: dict[int, float], draft_pass_ms: float) -> AdaptiveDraftPolicy:
    """A policy that has seen one sequence's steps of each token count cost ``step_ms``."""
    policy = AdaptiveDraftPolicy()
    for _ in range(5):
        for num_tokens, ms in step_ms.items():
            policy.observe_target(1, num_tokens, ms / 1e3)
        policy.observe_draft_pass(1, 1, draft_pass_ms / 1e3)
    return policy


def test_cost_model_prefers_measured_shapes_then_this_batch_then_the_line() -> None:
    """Shapes that were measured are predicted as measured (a staircase); an unmeasured token
    count at a measured batch size is that batch's plain step plus the marginal cost per token
    measured there; a batch size never seen comes from the line over every pass."""
    model = StepCostModel()
    for _ in range(20):
        for seqs, n, ms in ((1, 1, 25.0), (1, 3, 25.0), (1, 5, 43.0), (8, 8, 60.0),
                            (8, 16, 100.0), (1, 64, 120.0)):
            model.observe(seqs, n, ms / 1e3)
    assert abs(model.predict(1, 3) - 0.025) < 1e-9
    assert abs(model.predict(1, 5) - 0.043) < 1e-9
    assert abs(model.marginal_cost(8) - 0.005) < 1e-9  # (100 - 60) ms over 8 extra tokens
    assert abs(model.predict(8, 12) - 0.080) < 1e-9
    assert model.predict(1, 2) < model.predict(1, 32) < model.predict(1, 64)
    assert model.predict(32, 32) == model.a + model.b * 32
    model.observe(8, 1000, 0.5, prefill=True)  # prompt tokens: not what a verify slot costs
    assert abs(model.marginal_cost(8) - 0.005) < 1e-9
    assert abs(model.predict(8, 1000) - (0.060 + 992 * 0.005)) < 1e-9  # not its 0.5 s


def test_a_batch_size_without_its_own_marginal_cost_borrows_a_larger_ones_first() -> None:
    """A verify slot costs more the more compute-bound the pass: an unmeasured batch size takes
    the marginal cost of the nearest larger measured one (batch 1's nearly free slots must not
    price batch 8), and only above every measured size the nearest smaller one's."""
    model = StepCostModel()
    for _ in range(5):
        for seqs, n, ms in ((1, 1, 25.0), (1, 5, 25.2), (16, 16, 78.0), (16, 32, 98.0)):
            model.observe(seqs, n, ms / 1e3)
    assert model.marginal_cost(1) < 1e-4
    assert abs(model.marginal_cost(8) - 1.25e-3) < 1e-9  # batch 16's (98 - 78) ms / 16
    assert abs(model.marginal_cost(64) - 1.25e-3) < 1e-9


def test_a_small_batch_verify_cost_does_not_price_a_large_batch() -> None:
    """16 sequences verifying 4 drafts each (80 tokens) took less time than a plain step of 64
    sequences (64 tokens): 64 sequences with 16 drafts between them are priced from the
    64-sequence plain step, never below it. Once a drafted step at 64 has measured what a verify
    slot costs there, drafts of every other length are priced at that cost (K = 2-4 were never
    measured at 64), so a batch of 64 with good acceptance stays plain, while 16 still drafts."""
    policy = AdaptiveDraftPolicy()
    for _ in range(5):
        for seqs, n, ms in ((16, 16, 78.0), (16, 80, 150.0), (64, 64, 258.0), (64, 128, 441.0)):
            policy.observe_target(seqs, n, ms / 1e3)
        policy.observe_draft_pass(64, 64, 39e-3)
        policy.observe_draft_pass(16, 16, 20e-3)
    assert policy.target.predict(64, 80) > policy.target.predict(64, 64)
    assert abs(policy.target.marginal_cost(64) - 183e-3 / 64) < 1e-9
    crowd = _evidence(policy, [_seq(f"s{i}") for i in range(64)], 0.7)
    assert policy.choose(crowd, [4] * 64, 0).num_drafts == [0] * 64
    assert any(policy.choose(crowd[:16], [4] * 16, 0).num_drafts)  # at 16, drafting still pays


def test_a_shape_not_seen_for_long_falls_back_to_the_other_estimates() -> None:
    """One slow sample of a shape that is then never chosen again cannot pin its cost forever:
    after enough other observations it is predicted from the plain step and the marginal cost
    again, and the next sample of that shape replaces the old mean instead of blending with it."""
    model = StepCostModel()
    model.observe(1, 4, 1.0)  # a single outlier
    assert model.predict(1, 4) == 1.0
    for _ in range(StepCostModel.STALE_AFTER + 1):
        model.observe(1, 1, 0.025)
        model.observe(1, 8, 0.040)
    assert model.predict(1, 4) < 0.1
    model.observe(1, 4, 0.030)
    assert abs(model.predict(1, 4) - 0.030) < 1e-12


def test_staircase_cost_stops_k_where_the_step_gets_dearer() -> None:
    """Verifying up to 3 tokens costs one plain step and 4+ cost 60% more: with good acceptance
    the policy drafts exactly 2 tokens (3 verified), the most that stay free."""
    policy = _policy({1: 25.0, 2: 25.0, 3: 25.5, 4: 41.0, 5: 43.0, 6: 45.0}, draft_pass_ms=3.0)
    assert policy.choose([_known(policy, "a", 0.7)], [4], 0).num_drafts == [2]


def test_bad_acceptance_or_dear_drafts_turn_speculation_off() -> None:
    """A sequence whose drafts are mostly rejected, or a draft pass as dear as a target step,
    gets K = 0: speculation must never slow decoding down."""
    flat = {n: 25.0 for n in range(1, 8)}
    cheap, dear = _policy(flat, draft_pass_ms=3.0), _policy(flat, draft_pass_ms=30.0)
    assert cheap.choose([_known(cheap, "a", 0.02)], [4], 0).num_drafts == [0]
    assert dear.choose([_known(dear, "a", 0.5)], [4], 0).num_drafts == [0]


def test_compute_bound_batch_drafts_less_than_a_single_sequence() -> None:
    """When every extra verified token costs real time (a large, compute-bound batch), the
    policy drafts less per sequence than it does for a lone sequence with the same acceptance."""
    per_token = {n: 10.0 + 2.0 * n for n in range(1, 400)}
    policy = _policy(per_token, draft_pass_ms=3.0)
    lone = policy.choose([_known(policy, "a", 0.6)], [4], 0).num_drafts
    crowd_seqs = _evidence(policy, [_seq(f"s{i}") for i in range(64)], 0.6)
    crowd = policy.choose(crowd_seqs, [4] * 64, 0).num_drafts
    assert sum(crowd) / len(crowd) < lone[0]


def _drafting_steps(policy: AdaptiveDraftPolicy, draft_rate: float, plain_rate: float,
                    steps: int) -> list[bool]:
    """Run ``steps`` decode steps of one sequence whose drafted steps realise ``draft_rate``
    tokens/s and plain ones ``plain_rate``; return which steps drafted."""
    seq, drafted = _known(policy, "a", 0.7), []
    for _ in range(steps):
        decision = policy.choose([seq], [4], 0)
        k = decision.num_drafts[0]
        tokens = 2 if k else 1
        policy.observe_outcome(decision, k > 0, tokens,
                               tokens / (draft_rate if k else plain_rate))
        drafted.append(k > 0)
    return drafted


def test_outcomes_overrule_costs_when_drafting_realises_less() -> None:
    """The cost model predicts drafting pays (flat verify cost), but drafted steps realise fewer
    tokens per second than plain ones: drafting stops but for probes that get ever rarer
    (each one makes the draft model catch up on every token it skipped)."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    assert policy.choose([_known(policy, "a", 0.7)], [4], 0).num_drafts[0] > 0  # costs alone
    drafted = _drafting_steps(policy, draft_rate=30.0, plain_rate=40.0, steps=1000)
    assert sum(drafted[-4 * AdaptiveDraftPolicy.PROBE_EVERY:]) <= 2  # a probe drafts twice
    assert sum(drafted) <= 20  # gaps 32, 64, ... up to MAX_PROBE_GAP


def test_outcomes_keep_drafting_that_pays() -> None:
    """When drafted steps realise more tokens per second, the policy keeps drafting and only
    takes a plain step now and then to keep that comparison fresh, ever more rarely while
    drafting keeps winning (32, 64, 128, then every 256 steps)."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    drafted = _drafting_steps(policy, draft_rate=60.0, plain_rate=40.0, steps=1500)
    plain = [i for i, d in enumerate(drafted) if not d]
    gaps = [b - a for a, b in zip(plain, plain[1:])]
    assert gaps[:3] == [32, 64, 128] and set(gaps[3:]) == {256}


def test_plain_probes_come_back_often_once_drafting_loses() -> None:
    """After a long winning spell (plain probes 256 steps apart), drafting starts to lose: the
    policy notices at the next plain probe and stops drafting; once drafting wins again, plain
    probes start over at every 32 steps instead of trusting the old verdict for 256."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    _drafting_steps(policy, draft_rate=60.0, plain_rate=40.0, steps=1000)
    losing = _drafting_steps(policy, draft_rate=20.0, plain_rate=40.0, steps=1000)
    assert sum(losing[-500:]) <= 4  # only probes draft now
    winning = _drafting_steps(policy, draft_rate=60.0, plain_rate=40.0, steps=1200)
    resumed = next(i for i in range(len(winning) - 3) if all(winning[i:i + 3]))
    plain = [i for i, d in enumerate(winning) if not d and i > resumed]
    assert plain[0] - resumed <= 32 and plain[1] - plain[0] == 64  # the gaps start over


def test_a_draft_catch_up_step_is_not_counted_as_drafting_speed() -> None:
    """A step whose draft model first prefilled a new prompt is slow once; its rate must not be
    taken for what drafting realises, or drafting would be judged a loss from the start."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    seq = _known(policy, "a", 0.7)
    first = policy.choose([seq], [4], 0)
    assert first.num_drafts[0] > 0
    policy.observe_outcome(first, True, 1, 1.0, catch_up=True)
    assert all(r.draft_rate is None for r in policy.records.values())
    policy.observe_outcome(policy.choose([seq], [4], 0), True, 3, 0.05)
    assert [r.draft_rate for r in policy.records.values()] == [60.0]


def test_acceptance_estimate_is_per_token_alpha_whatever_k() -> None:
    """Drafts of a sequence with per-token acceptance alpha = 2/3, judged with K = 4 (each step
    accepts 2, then rejects) or K = 2 (accepts 2 of 2), estimate the same alpha; accepted /
    proposed would say 0.5 for K = 4 and 1.0 for K = 2, steering K by the K it was measured at."""
    long_drafts, short_drafts = AcceptanceCounts(), AcceptanceCounts()
    for _ in range(30):
        long_drafts.record(proposed=4, accepted=2)
        short_drafts.record(proposed=3, accepted=2)  # 2 accepted, the 3rd rejected
    assert estimated_acceptance(long_drafts, 0.7) == pytest.approx(2 / 3, abs=0.005)
    assert estimated_acceptance(short_drafts, 0.7) == pytest.approx(2 / 3, abs=0.005)
    long_drafts.record(proposed=4, accepted=0)  # one bad step lowers it, gently
    assert 0.55 < estimated_acceptance(long_drafts, 0.7) < 2 / 3


def test_one_drafted_step_moves_acceptance_only_part_way_from_the_prior() -> None:
    """A single drafted step (1 of 1 accepted, or 0 of 1) is weak evidence: the estimate moves
    from the prior toward it but stays far from 1 or 0, so one lucky draft does not earn K = 4
    in a batch that cannot afford it; evidence fades while the sequence drafts nothing, once
    the step that kept it plain is done (choosing itself changes no evidence)."""
    lucky, unlucky = AcceptanceCounts(), AcceptanceCounts()
    assert estimated_acceptance(lucky, 0.7) == pytest.approx(0.7)
    lucky.record(proposed=1, accepted=1)
    unlucky.record(proposed=1, accepted=0)
    assert 0.7 < estimated_acceptance(lucky, 0.7) < 0.85
    assert 0.4 < estimated_acceptance(unlucky, 0.7) < 0.7
    policy = _policy({n: 25.0 + 20.0 * n for n in range(1, 40)}, draft_pass_ms=3.0)
    hopeless = _seq("hopeless")
    policy.by_request["hopeless"] = AcceptanceCounts()
    policy.by_request["hopeless"].record(proposed=4, accepted=0)
    before = policy.acceptance(hopeless)
    decision = policy.choose([hopeless], [4], 0)
    assert decision.num_drafts == [0]  # dear verify slots: no drafts
    assert policy.acceptance(hopeless) == before  # asking changed nothing
    policy.observe_outcome(decision, False, 1, 0.045)
    assert policy.acceptance(hopeless) > before  # drifting back toward the prior


def test_realised_rates_age_with_the_steps_of_their_range() -> None:
    """A probe after a long stretch of the other arm is judged on what it realises now: the
    drafted arm's losing samples from 500 steps ago no longer outvote two winning probe steps
    (with per-sample memory, drafting never resumed within 1200 steps)."""
    record = DraftingRecord()
    for step in range(40):
        record.steps = step
        record.observe(True, 1.0, 1 / 20)  # drafting realised 20 tokens/s
    record.steps = 540
    record.observe(True, 3.0, 3 / 60)  # a probe realising 60 tokens/s
    assert record.draft_rate == pytest.approx(60.0, rel=0.01)


def test_a_verdict_that_drafting_loses_carries_to_larger_batches() -> None:
    """Where drafted steps realised less at 2-3 sequences, a first batch of 4-7 (more compute
    bound, so dearer verify slots) does not explore drafting from scratch: it drafts only as a
    probe, after PROBE_EVERY plain steps; a smaller batch still explores on its own."""
    policy = _policy({n: 25.0 for n in range(1, 40)}, draft_pass_ms=3.0)
    pair = _evidence(policy, [_seq("a"), _seq("b")], 0.7)
    for _ in range(40):
        decision = policy.choose(pair, [4, 4], 0)
        drafts = any(decision.num_drafts)
        policy.observe_outcome(decision, drafts, 4 if drafts else 2, 0.1 if drafts else 0.025)
    assert policy.records[2].drafting_loses()
    crowd = _evidence(policy, [_seq(f"s{i}") for i in range(5)], 0.7)
    drafted = []
    for _ in range(AdaptiveDraftPolicy.PROBE_EVERY + 2):
        decision = policy.choose(crowd, [4] * 5, 0)
        policy.observe_outcome(decision, any(decision.num_drafts), 5, 0.025)
        drafted.append(any(decision.num_drafts))
    assert not any(drafted[:AdaptiveDraftPolicy.PROBE_EVERY - 1]) and any(drafted)
    lone = _known(policy, "lone", 0.7)
    assert any(policy.choose([lone], [4], 0).num_drafts)  # below the losing range


def test_resuming_drafts_weighs_the_draft_models_catch_up() -> None:
    """A sequence that skipped drafting for 2,000 tokens must feed them all to the draft model
    before it drafts again; where that pass costs far more than drafting would gain over the
    next steps, the policy keeps decoding plain, while an in-sync sequence drafts."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    for _ in range(5):
        policy.observe_draft_pass(1, 2002, 2.0)  # a 2,000-token catch-up pass: 2 s
    synced, behind = _known(policy, "synced", 0.7), _known(policy, "behind", 0.7)
    behind.token_ids += [5] * 2000
    synced.num_draft_computed = len(synced.token_ids) - 1
    assert policy.choose([synced], [4], 0).num_drafts[0] > 0
    assert policy.choose([behind], [4], 0).num_drafts == [0]


def test_a_new_sequence_starts_from_what_the_drafter_has_been_accepted_at() -> None:
    """Once an n-gram drafter's proposals have mostly been rejected (random text), a sequence
    it has not drafted for yet is expected to fare the same, not at the default 0.7, so a
    compute-bound batch spends no verify slots on it; a drafter whose drafts were mostly
    accepted lifts new sequences above the default instead."""
    per_token = {n: 20.0 + 1.0 * n for n in range(1, 400)}
    failing, succeeding = _policy(per_token, 0.0), _policy(per_token, 0.0)
    for i in range(200):
        failing.record_acceptance(_seq(f"f{i}"), proposed=2, accepted=0)
        succeeding.record_acceptance(_seq(f"s{i}"), proposed=2, accepted=2)
    assert failing.acceptance(_seq("new")) < 0.05
    assert succeeding.acceptance(_seq("new")) > 0.9
    crowd = [_seq(f"c{i}") for i in range(64)]
    assert failing.choose(crowd, [4] * 64, 0).num_drafts == [0] * 64
    assert any(succeeding.choose(crowd, [4] * 64, 0).num_drafts)



def test_drafting_that_promises_only_a_little_is_not_taken() -> None:
    """A draft that is predicted to gain less than REQUIRED_GAIN is not taken: 8 sequences at
    alpha 0.6 with one draft each expect 12.8 tokens in 155 ms against 8 in 100 ms plain,
    1.03x, so the step stays plain; with a cheap verify slot (111 ms, 1.44x) they draft."""
    dear, cheap = AdaptiveDraftPolicy(), AdaptiveDraftPolicy()
    for _ in range(5):
        for policy, verify_ms in ((dear, 154.0), (cheap, 110.0)):
            policy.observe_target(8, 8, 100e-3)
            policy.observe_target(8, 16, verify_ms / 1e3)
            policy.observe_draft_pass(8, 8, 1e-3)
    crowd = _evidence(cheap, _evidence(dear, [_seq(f"s{i}") for i in range(8)], 0.6), 0.6)
    assert dear.choose(crowd, [1] * 8, 0).num_drafts == [0] * 8
    assert cheap.choose(crowd, [1] * 8, 0).num_drafts == [1] * 8


def test_an_outcome_teaches_the_range_of_the_decision_it_answers() -> None:
    """Each step's decision comes back with its outcome, so outcomes land where they belong
    even when another decision was made in between: a pair's drafted step teaches the range of
    2-3 sequences, not the lone sequence's range asked about after it."""
    policy = _policy({n: 25.0 for n in range(1, 8)}, draft_pass_ms=3.0)
    pair = policy.choose(_evidence(policy, [_seq("a"), _seq("b")], 0.7), [4, 4], 0)
    lone = policy.choose([_known(policy, "c", 0.7)], [4], 0)
    policy.observe_outcome(pair, True, 6, 0.1)
    assert policy.records[2].draft_rate == pytest.approx(30.0)
    assert policy.records[1].draft_rate is None
    policy.observe_outcome(lone, True, 3, 0.05)
    assert policy.records[1].draft_rate == pytest.approx(60.0)


def test_a_sequence_is_forgotten_when_it_finishes_or_is_aborted() -> None:
    """The policy keeps each sequence's acceptance while it runs, and the scheduler has it
    dropped when the sequence finishes or is aborted (the drafter's own counts remain)."""
    policy = AdaptiveDraftPolicy(adaptive=False)  # K = the cap: every decode step drafts
    sched = Scheduler(SchedulerConfig(max_context=256, num_speculative_tokens=2),
                      BlockAllocator(64), draft_policy=policy)
    sched.add("finishes", [1, 2, 3], RequestParams(max_tokens=6))
    sched.add("aborted", [1, 2, 3], RequestParams(max_tokens=50))

    def step() -> None:
        """Propose 9s in every draft slot; the model accepts the first draft, then says 7."""
        plan = sched.schedule()
        for item in plan.scheduled:
            item.draft_token_ids = [9] * item.num_draft_slots
        sched.postprocess(plan, [item.draft_token_ids[:1] + [7] if item.samples else []
                                 for item in plan.scheduled])

    step()  # prefill
    step()  # both draft
    assert set(policy.by_request) == {"finishes", "aborted"}
    sched.abort("aborted")
    assert set(policy.by_request) == {"finishes"}
    while sched.has_unfinished():
        step()
    assert policy.by_request == {} and policy.drafter_counts.judged > 0
