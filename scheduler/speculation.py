"""Adaptive speculation: how many draft tokens (K) each sequence gets this step.

A step's time is the target's cost for its ``s`` sequences and ``n`` tokens (each verify slot
adds to ``n``) plus, for each draft pass j, the draft's cost for the ``n_j`` sequences still
drafting in that pass. Both costs are learned online (``StepCostModel``: measured per shape,
else the plain step at this batch size plus a measured cost per extra token, else a fitted
line). A sequence with acceptance rate α expects ``(1 - α^(K+1)) / (1 - α)`` tokens from K
drafts. The policy picks the shared cap that maximises expected tokens per second for the whole
batch, and also tries dropping each draft whose expected gain ``α^j`` is worth less than its
verify slot; it drafts only where that promises ``REQUIRED_GAIN`` over plain decoding. At
low load (memory-bound, verify slots nearly free) this approaches the single-sequence theory;
under heavy load (compute-bound, each slot costs a token's worth of time) K falls to 0 and the
step is plain decoding. A draft pass is timed on its own, so a pass that also catches the draft
up on a new prompt is learned as the many-token pass it is.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from scheduler.sequence import Sequence

ACCEPTANCE_MEMORY = 0.9  # per step: a sequence's acceptance reflects about its last 10 steps
# While a sequence does not draft, its evidence fades by this per step, so its acceptance
# drifts back toward the prior and it gets tried again.
FADE_WHILE_PLAIN = 0.95
PRIOR_WEIGHT = 2.0  # the prior acceptance counts as this many judged drafts
# Per sequence-step: the drafter's acceptance over its recent ~100 sequence-steps, which is the
# prior of each sequence (a draft model's drafts and random text's n-grams differ widely).
DRAFTER_MEMORY = 0.99
# A sequence that resumes drafting first feeds the draft model every token it skipped: a cost
# paid once, so it is spread over this many drafted steps when drafting is weighed.
CATCH_UP_PAYBACK_STEPS = 8
# Drafting must promise this much more than plain decoding. Near break-even the prediction's
# errors and what it leaves out (the catch-up after plain steps, sequences that then finish at
# different steps) decide: at batch 64 on a CPU, drafted steps that promised a few per cent
# realised 0.94-0.96x plain decoding.
REQUIRED_GAIN = 1.05


MAX_ACCEPTANCE = 0.99  # a sequence's alpha is never taken as certain


@dataclass(slots=True)
class AcceptanceCounts:
    """Decayed counts of accepted drafts and of drafts judged, forgetting at ``memory`` a step.

    Acceptance stops at the first rejection, so a step judges its accepted drafts and that one:
    accepted / judged estimates the per-token alpha (the maximum-likelihood estimate for the
    theory's geometric acceptance). Accepted / proposed would not: for the same alpha it falls
    as K grows (drafts after a rejection are never judged), which steered K down.
    """

    memory: float = ACCEPTANCE_MEMORY
    accepted: float = 0.0
    judged: float = 0.0

    def record(self, proposed: int, accepted: int) -> None:
        """Add one step's drafts: ``accepted`` of the ``proposed`` were accepted."""
        self.accepted = self.memory * self.accepted + accepted
        self.judged = self.memory * self.judged + _judged(proposed, accepted)

    def fade(self, factor: float) -> None:
        self.accepted *= factor
        self.judged *= factor

    def shrunk(self, prior: float) -> float:
        """accepted / judged, with ``prior`` counted as ``PRIOR_WEIGHT`` judged drafts."""
        return (self.accepted + PRIOR_WEIGHT * prior) / (self.judged + PRIOR_WEIGHT)


def _judged(proposed: int, accepted: int) -> int:
    """Drafts a step judged: the accepted ones, and the first rejected one if any."""
    return accepted + (accepted < proposed)


def estimated_acceptance(counts: AcceptanceCounts, prior: float) -> float:
    """A sequence's alpha from its counts, with the prior worth ``PRIOR_WEIGHT`` judged drafts.

    Without the prior, one drafted step says alpha is 0 or 1 (1 of 1 accepted, or 0 of 1): a
    batch's first probe then gave half its sequences K = 4 and promised a 60 % gain that a
    compute-bound batch could never realise.
    """
    return min(counts.shrunk(prior), MAX_ACCEPTANCE)


class StepCostModel:
    """A pass's time from its shape: how many sequences it serves and how many tokens it runs.

    Three estimates, the most specific that is fresh wins:

    1. The shape itself, measured (token counts up to ``MAX_TABULATED``): its own mean. Cost is
       a staircase, not a line, and a machine-specific one (on one CPU host a 3-token forward
       cost what a 1-token one does and a 4-token one 50% more; on another, 2 and 3 tokens cost
       1.5x and 1.9x one token and 4-5 tokens no more than 3): the policy sees where a draft is
       cheap.
    2. The plain step of as many sequences (one token each), measured, plus the extra tokens at
       the marginal cost per token measured at this batch size (else ``marginal_cost`` says).
       Sequences matter as much as tokens: each brings its own attention over its context, and
       from some batch size on every extra row costs real compute. Keyed by tokens alone, 16
       sequences verifying 4 drafts each (80 tokens, measured) made drafting for 64 sequences
       look nearly free, and it ran at 0.96x plain decoding.
    3. A line ``a + b * num_tokens``: online least squares with exponential forgetting over
       every pass, for shapes and batch sizes not seen yet.

    A measurement not refreshed for ``STALE_AFTER`` observations is dropped in favour of the
    next estimate and taken afresh when next seen, so one slow sample (a noisy neighbour) cannot
    keep the policy away from that shape for good.
    """

    MAX_TABULATED = 512
    STALE_AFTER = 500

    def __init__(self, a: float = 1.0, b: float = 0.01, decay: float = 0.97) -> None:
        self.a, self.b, self.decay = a, b, decay
        self._sums = [0.0] * 5  # weight, n, t, n*n, n*t
        # (sequences, tokens) -> (mean seconds, observation count when last seen)
        self._measured: dict[tuple[int, int], tuple[float, int]] = {}
        self._marginal: dict[int, tuple[float, int]] = {}  # sequences -> seconds per extra token
        self._num_observed = 0

    def predict(self, num_seqs: int, num_tokens: int) -> float:
        exact = self._fresh(self._measured, (num_seqs, num_tokens))
        if exact is not None:
            return exact
        plain = self._fresh(self._measured, (num_seqs, num_seqs))
        if plain is not None and num_tokens > num_seqs:
            return plain + self.marginal_cost(num_seqs) * (num_tokens - num_seqs)
        return self.a + self.b * num_tokens

    def marginal_cost(self, num_seqs: int) -> float:
        """Seconds one more token adds to a pass over ``num_seqs`` sequences.

        Where this batch size has no measurement, the nearest larger one's (a token costs more
        the more compute-bound the pass, so that errs toward not drafting), else the nearest
        smaller one's: then a first drafted step at this size measures its own.
        """
        own = self._fresh(self._marginal, num_seqs)
        if own is not None:  # the usual case, asked several times a step: no scan
            return own
        fresh = [s for s, entry in self._marginal.items() if not self._stale(entry)]
        larger = [s for s in fresh if s > num_seqs]
        if larger:
            return self._marginal[min(larger)][0]
        return self._marginal[max(fresh)][0] if fresh else self.b

    def observe(self, num_seqs: int, num_tokens: int, seconds: float,
                prefill: bool = False) -> None:
        """One pass's time. ``prefill``: it also ran prompt tokens, which only teach the line.
        They cost differently from verify slots (long chunks multiply efficiently, no logits),
        and the policy asks for a shape by its decoding sequences alone."""
        self._num_observed += 1
        if prefill:
            self._fit_line(float(num_tokens), seconds)
            return
        plain = self._fresh(self._measured, (num_seqs, num_seqs))
        if plain is not None and num_tokens > num_seqs:
            per_token = max(0.0, (seconds - plain) / (num_tokens - num_seqs))
            self._blend(self._marginal, num_seqs, per_token)
        if num_tokens <= self.MAX_TABULATED:
            self._blend(self._measured, (num_seqs, num_tokens), seconds)
        self._fit_line(float(num_tokens), seconds)

    def _fresh(self, table: dict[Any, tuple[float, int]], key: Any) -> float | None:
        entry = table.get(key)
        return None if entry is None or self._stale(entry) else entry[0]

    def _stale(self, entry: tuple[float, int]) -> bool:
        return self._num_observed - entry[1] > self.STALE_AFTER

    def _blend(self, table: dict[Any, tuple[float, int]], key: Any, value: float) -> None:
        old = self._fresh(table, key)
        mean = value if old is None else 0.8 * old + 0.2 * value
        table[key] = (mean, self._num_observed)

    def _fit_line(self, n: float, t: float) -> None:
        self._sums = [self.decay * s + x for s, x in zip(self._sums, (1.0, n, t, n * n, n * t))]
        w, sn, st, snn, snt = self._sums
        variance = w * snn - sn * sn
        if variance > 1e-9 * max(1.0, w * snn):
            b = (w * snt - sn * st) / variance
            self.b = max(b, 0.0)
            self.a = max((st - self.b * sn) / w, 1e-9)
        else:  # every pass the same size: keep b, refit the intercept
            self.a = max(st / w - self.b * sn / w, 1e-9)


PROBE_EVERY = 32  # first gap between plain probes, and between probes of a losing drafter
MAX_PROBE_GAP = 512  # the longest gap between probes of a losing drafter
MAX_PLAIN_GAP = 256  # the longest gap between plain probes while drafting keeps winning


RATE_MEMORY = 0.9  # per step: an arm's rate reflects about the last 10 steps of the range


@dataclass(slots=True)
class RealisedRate:
    """Tokens per second per sequence of one arm, as decayed sums (tokens over seconds).

    A ratio of sums, not an average of per-step rates: a drafted step emits 1 to K+1 tokens, so
    single steps swing widely, and a short average of them flipped the verdict on noise alone
    (a run of rejections stopped drafting for a stretch that then cost the draft model a
    catch-up, which made drafting look worse again). Evidence ages with the steps of the range,
    not with this arm's own samples: a probe after hundreds of steps of the other arm is judged
    on what it realises now, not outvoted by samples from long ago.
    """

    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, tokens: float, seconds: float, age: int) -> None:
        """One step's outcome, ``age`` steps after this arm's previous one."""
        fade = RATE_MEMORY ** age
        self.tokens = fade * self.tokens + tokens
        self.seconds = fade * self.seconds + seconds

    @property
    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass(slots=True)
class DraftingRecord:
    """Realised decoding speed, with and without drafts, at one range of batch sizes."""

    plain: RealisedRate = field(default_factory=RealisedRate)  # steps without drafts
    drafted: RealisedRate = field(default_factory=RealisedRate)  # steps with drafts
    steps: int = 0  # decode steps planned in this range
    last_plain: int = 0  # step counts at the last sample of each arm
    last_draft: int = 0
    draft_probe_every: int = PROBE_EVERY  # while drafting loses: doubles after each probe
    plain_probe_every: int = PROBE_EVERY  # while drafting wins: doubles after each plain probe
    probe_steps_left: int = 0  # a probe drafts twice: not only the catch-up resuming costs

    @property
    def plain_rate(self) -> float | None:
        return self.plain.rate

    @property
    def draft_rate(self) -> float | None:
        return self.drafted.rate

    def observe(self, drafted: bool, tokens_per_seq: float, seconds: float) -> None:
        if drafted:
            self.drafted.add(tokens_per_seq, seconds, self.steps - self.last_draft)
            self.last_draft = self.steps
        else:
            self.plain.add(tokens_per_seq, seconds, self.steps - self.last_plain)
            self.last_plain = self.steps

    def drafting_loses(self) -> bool:
        return self.plain_rate is not None and self.draft_rate is not None and \
            self.draft_rate < self.plain_rate

    def lets_draft(self, loses_at_smaller_batches: bool = False) -> bool:
        """May this step draft, when the cost model says it should?

        ``loses_at_smaller_batches``: a smaller range's verdict is that drafting loses. A
        larger batch is more compute-bound, so each verify slot costs more there: until this
        range has a drafted sample of its own it takes that verdict, probing like a range
        where drafting lost instead of exploring from scratch.
        """
        if self.probe_steps_left:
            self.probe_steps_left -= 1
            return True
        if self.drafting_loses() or (loses_at_smaller_batches and self.draft_rate is None):
            # Probe drafting ever more rarely: after plain steps the draft model must first
            # catch up on every token it skipped, so each probe costs a draft prefill.
            if self.steps - self.last_draft < self.draft_probe_every:
                return False
            self.draft_probe_every = min(2 * self.draft_probe_every, MAX_PROBE_GAP)
            self.plain_probe_every = PROBE_EVERY
            self.probe_steps_left = 1
            return True
        self.draft_probe_every = PROBE_EVERY
        if self.plain_rate is None:
            return self.steps <= 2  # a first plain sample, soon
        if self.steps - self.last_plain < self.plain_probe_every:
            return True
        # Drafting has won since the last plain step: each plain probe costs the tokens a
        # drafted step would have made, so they get rarer while the verdict holds. A stale
        # plain rate errs safe: should plain decoding have got faster, drafting is judged to
        # lose and plain steps are measured again.
        self.plain_probe_every = min(2 * self.plain_probe_every, MAX_PLAIN_GAP)
        return False


@dataclass(frozen=True, slots=True)
class DraftDecision:
    """What ``choose`` decided for one step; ``observe_outcome`` takes it back with the outcome.

    The scheduler keeps it on the step's plan, so nothing of the step waits inside the policy.
    """

    num_drafts: list[int]  # K for each decoding sequence, in the order they were asked for
    # the range of batch sizes whose realised rates this step's outcome teaches; None: none
    # (not adaptive, nothing decoding, or prompt tokens in the step would blur the rate)
    bucket: int | None = None
    num_seqs: int = 0  # decoding sequences, to turn the step's tokens into tokens per sequence
    # sequences the costs kept plain: their evidence fades once the step is done, so their
    # acceptance drifts back toward the prior and they get tried again
    kept_plain: tuple[str, ...] = ()


class AdaptiveDraftPolicy:
    """Chooses K per sequence from its recent acceptance and the current batch.

    The cost model's choice is checked against outcomes: per range of batch sizes (powers of
    two) it keeps the realised tokens per second per sequence of steps with and without drafts,
    from decode-only steps. Where drafting realised less, drafting stops there but for probes
    ever further apart (``PROBE_EVERY`` doubling up to ``MAX_PROBE_GAP`` steps); where it
    realised more, plain probes keep the comparison fresh, ever further apart while drafting
    keeps winning (``PROBE_EVERY`` doubling up to ``MAX_PLAIN_GAP``). (Predicted
    costs alone mislead where the verify cost is not flat: a CPU whose 2- and 3-row matrix
    multiplies cost 2-3x one row kept drafting at 0.86-0.89x plain speed at batches 16 and 64.)

    Evidence comes in through ``record_acceptance`` (each sequence's drafts judged),
    ``observe_outcome`` (the step ``choose`` planned, as realised) and the ``observe_*`` costs;
    ``forget`` drops a sequence that finished. Asking (``acceptance``) changes nothing.
    """

    PROBE_EVERY = PROBE_EVERY

    def __init__(self, adaptive: bool = True, draft_cost: float = 0.05,
                 prior_acceptance: float = 0.7) -> None:
        self.adaptive = adaptive
        self.draft_cost = draft_cost  # draft pass / target step, until draft passes are timed
        self.target = StepCostModel()
        self.draft_pass = StepCostModel(b=0.0)
        self.num_draft_observations = 0  # until the first, a pass costs draft_cost target steps
        self.prior_acceptance = prior_acceptance  # until the drafter has been judged
        self.drafter_counts = AcceptanceCounts(DRAFTER_MEMORY)  # over all sequences
        self.by_request: dict[str, AcceptanceCounts] = {}  # each live sequence's own counts
        self.records: dict[int, DraftingRecord] = {}  # batch-size bucket -> outcomes

    # -- evidence ------------------------------------------------------------------------------

    def observe_outcome(self, decision: DraftDecision, drafted: bool, num_tokens: int,
                        seconds: float, catch_up: bool = False) -> None:
        """The step ``decision`` planned emitted ``num_tokens`` in ``seconds`` (all in).

        ``catch_up``: its draft model first prefilled a new prompt, a one-off cost and not the
        rate drafting runs at, so the step is not counted. (Catching up on tokens skipped
        during plain steps is counted: it is what stopping and resuming drafting costs.)
        """
        for request_id in decision.kept_plain:
            counts = self.by_request.get(request_id)
            if counts is not None:  # else it finished this step, or never drafted: nothing to fade
                counts.fade(FADE_WHILE_PLAIN)
        if decision.bucket is not None and seconds > 0 and not catch_up:
            record = self.records[decision.bucket]
            record.observe(drafted, num_tokens / decision.num_seqs, seconds)

    def observe_target(self, num_seqs: int, num_tokens: int, seconds: float,
                       prefill: bool = False) -> None:
        self.target.observe(num_seqs, num_tokens, seconds, prefill)

    def observe_draft_pass(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        self.draft_pass.observe(num_seqs, num_tokens, seconds)
        self.num_draft_observations += 1

    def record_acceptance(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """One sequence-step's drafts judged: update the sequence's and the drafter's counts."""
        self.by_request.setdefault(seq.request_id, AcceptanceCounts()).record(proposed, accepted)
        self.drafter_counts.record(proposed, accepted)

    def forget(self, request_id: str) -> None:
        """The sequence finished or was aborted: its counts go (the drafter's stay)."""
        self.by_request.pop(request_id, None)

    # -- queries -------------------------------------------------------------------------------

    def draft_pass_seconds(self, num_seqs: int, num_tokens: int) -> float:
        if self.num_draft_observations:
            return self.draft_pass.predict(num_seqs, num_tokens)
        return self.draft_cost * self.target.predict(num_seqs, num_tokens)

    @property
    def drafter_acceptance(self) -> float:
        """What this drafter's drafts have been accepted at lately: each sequence's prior."""
        return self.drafter_counts.shrunk(self.prior_acceptance)

    def acceptance(self, seq: Sequence) -> float:
        counts = self.by_request.get(seq.request_id)
        return estimated_acceptance(counts if counts is not None else AcceptanceCounts(),
                                    self.drafter_acceptance)

    # -- the decision --------------------------------------------------------------------------

    def choose(self, seqs: Seq[Sequence], caps: Seq[int],
               num_other_tokens: int) -> DraftDecision:
        """K for each sequence (at most its cap); ``num_other_tokens`` = prefill tokens etc.

        Choosing counts the step in its range's probe schedule; what is known about each
        sequence changes only when the outcome comes back.
        """
        if not self.adaptive or not seqs:
            return DraftDecision(list(caps))
        by_cost = self._by_cost(seqs, caps, num_other_tokens)
        bucket = len(seqs).bit_length()
        record = self.records.setdefault(bucket, DraftingRecord())
        record.steps += 1
        lets_draft = not any(by_cost) or record.lets_draft(self._loses_below(bucket))
        return DraftDecision(
            num_drafts=by_cost if lets_draft else [0] * len(seqs),
            bucket=bucket if num_other_tokens == 0 else None,  # prefill would blur the rates
            num_seqs=len(seqs),
            kept_plain=tuple(s.request_id for s, k in zip(seqs, by_cost) if k == 0),
        )

    def _loses_below(self, bucket: int) -> bool:
        return any(b < bucket and r.drafting_loses() for b, r in self.records.items())

    def _by_cost(self, seqs: Seq[Sequence], caps: Seq[int], num_other_tokens: int) -> list[int]:
        """The K per sequence that maximises predicted tokens per second."""
        alphas = [self.acceptance(s) for s in seqs]
        # tokens the draft model has not seen beyond the 1-2 a drafting sequence feeds it
        behind = [max(0, len(s.token_ids) - s.num_draft_computed - 2) for s in seqs]
        base = num_other_tokens + len(seqs)

        def rate(ks: list[int]) -> float:
            return self._rate(alphas, ks, base, behind)

        best_rate, best_ks = REQUIRED_GAIN * rate([0] * len(seqs)), [0] * len(seqs)
        slot_cost = self.target.marginal_cost(len(seqs))
        for k_max in range(1, max(caps, default=0) + 1):
            full = [min(k_max, cap) for cap in caps]
            # trimming by the marginal cost can be wrong on a staircase: keep both
            for ks in (full, self._trim(alphas, full, slot_cost * rate(full))):
                candidate = rate(ks)
                if candidate > best_rate:
                    best_rate, best_ks = candidate, ks
        return best_ks

    def _rate(self, alphas: list[float], ks: list[int], base: int, behind: list[int]) -> float:
        tokens = sum((1 - a ** (k + 1)) / (1 - a) for a, k in zip(alphas, ks))
        seconds = self.target.predict(len(ks), base + sum(ks))
        for j in range(1, max(ks, default=0) + 1):
            passing = sum(k >= j for k in ks)
            seconds += self.draft_pass_seconds(passing, passing)
        drafting = sum(k > 0 for k in ks)
        skipped = sum(b for b, k in zip(behind, ks) if k > 0)
        if skipped:  # at a large batch, resuming can cost more than drafting ever gains
            catch_up = self.draft_pass_seconds(drafting, drafting + skipped) - \
                self.draft_pass_seconds(drafting, drafting)
            seconds += catch_up / CATCH_UP_PAYBACK_STEPS
        return tokens / seconds

    def _trim(self, alphas: list[float], ks: list[int], slot_value: float) -> list[int]:
        """Drop draft j of a sequence when its expected gain α^j (tokens) is worth less than
        ``slot_value``, the tokens its verify slot's time would make at the current rate."""
        trimmed = []
        for alpha, k in zip(alphas, ks):
            while k > 0 and alpha ** k < slot_value:
                k -= 1
            trimmed.append(k)
        return trimmed
