"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step: decode-ready sequences first (one token plus K speculative slots each), then running
prefills in chunks, then waiting requests by (priority, arrival) while blocks and the per-step token
budget allow. When the pool cannot hold a running sequence's next tokens, the lowest-priority,
newest sequence is preempted by recompute: its blocks are freed and it waits again with prompt +
output so far. Out of blocks is never an error.

With a prefix cache in the allocator, an admitted sequence starts from the cached blocks of its
longest known prefix (``prefix.py``): its block table is seeded with them and its computed count
moved past them, so its prefill starts after the hit; admission counts only the blocks it lacks.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvpool.allocator import BlockAllocator
from kvpool.block_table import BlockTable
from scheduler.errors import InvalidRequestError
from scheduler.params import RequestParams
from scheduler.prefix import NO_HIT, PrefixHit, PrefixMatcher
from scheduler.sequence import Sequence, SequenceStatus, TextStream
from scheduler.speculation import DraftDecision

if TYPE_CHECKING:
    from scheduler.grammar import TokenConstraint


class DraftPolicy(Protocol):
    def choose(self, seqs: Seq[Sequence], caps: Seq[int],
               num_other_tokens: int) -> DraftDecision:
        """K for each decoding sequence this step (``num_drafts``), each at most its cap."""
        ...

    def record_acceptance(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """How many of the ``proposed`` drafts of ``seq`` were accepted this step."""
        ...

    def forget(self, request_id: str) -> None:
        """The sequence finished or was aborted: drop what is kept about it."""
        ...


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    max_context: int = 2048
    num_speculative_tokens: int = 0  # upper bound on K per sequence and step
    watermark_blocks: int = 1  # admission keeps this many blocks free for running sequences

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: query tokens from ``seq.num_computed`` plus K draft slots."""

    seq: Sequence
    num_query_tokens: int
    num_draft_slots: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def constraint(self) -> TokenConstraint | None:
        """The sequence's grammar matcher, if its output is constrained."""
        return self.seq.constraint

    @property
    def samples(self) -> bool:
        """True when the step reaches the end of the sequence, so a token is sampled."""
        return self.num_query_tokens == self.seq.num_uncomputed

    @property
    def num_tokens(self) -> int:
        return self.num_query_tokens + self.num_draft_slots


@dataclass(slots=True)
class StepPlan:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    # the draft policy's choice for this step, handed back to it with the step's outcome
    draft_decision: DraftDecision | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(slots=True)
class SeqUpdate:
    """What one step changed for one request."""

    seq: Sequence
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator,
                 eos_token_ids: Iterable[int] = (),
                 draft_policy: DraftPolicy | None = None) -> None:
        self.config = config
        self.allocator = allocator
        self.eos_token_ids = frozenset(eos_token_ids)
        self.draft_policy = draft_policy
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._pending: list[SeqUpdate] = []  # finished outside a step (abort, nothing left to do)
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        cache = allocator.prefix_cache
        self.prefix = PrefixMatcher(cache, config.block_size) if cache is not None else None

    # -- requests in and out -------------------------------------------------------------------

    def add(self, request_id: str, prompt_ids: Seq[int], params: RequestParams,
            forced_output_ids: Seq[int] = (), text: TextStream | None = None,
            constraint: TokenConstraint | None = None) -> Sequence:
        """Queue a request; raises ``InvalidRequestError`` when it can never run.

        ``constraint``: a matcher already past ``forced_output_ids``."""
        self.validate(request_id, prompt_ids, params)
        seq = Sequence(request_id, prompt_ids, params, next(self._arrivals),
                       forced_output_ids, text, constraint)
        self._by_id[request_id] = seq
        if seq.num_output_tokens >= params.max_tokens:
            self._finish(seq, "length")
            self._pending.append(SeqUpdate(seq, [], "", True, "length"))
            return seq
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        return seq

    def validate(self, request_id: str, prompt_ids: Seq[int], params: RequestParams) -> None:
        """Raise ``InvalidRequestError`` for a request ``add`` would refuse."""
        if request_id in self._by_id:
            raise InvalidRequestError(f"request id {request_id!r} is already in the engine")
        params.validate()
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.config.max_context:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context of {self.config.max_context} tokens")
        blocks = -(-total // self.config.block_size)
        if blocks > self.allocator.num_blocks:
            raise InvalidRequestError(
                f"request needs {blocks} KV blocks but the pool has only "
                f"{self.allocator.num_blocks}; it can never fit")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final update comes with the next step."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.is_finished:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, "abort")
        self._pending.append(SeqUpdate(seq, [], "", True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    def block_tables(self) -> list[list[int]]:
        """Block ids of every live sequence, for ``BlockAllocator.check_integrity``."""
        return [s.block_table.block_ids for s in self.running if s.block_table is not None]

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan([], [])
        budget = self.config.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        num_prefill = sum(s.num_uncomputed for s in prefilling)
        plan.draft_decision = decision = self._choose_drafts(decoding, budget, num_prefill)
        drafts = decision.num_drafts if decision is not None else [0] * len(decoding)
        for seq, num_drafts in zip(decoding, drafts):
            if seq.status is SequenceStatus.RUNNING and budget > 0:
                num_drafts = min(num_drafts, budget - 1)
                budget -= self._schedule_running(seq, 1, num_drafts, plan)
        for seq in prefilling:
            if seq.status is SequenceStatus.RUNNING and budget > 0:
                budget -= self._schedule_running(seq, min(seq.num_uncomputed, budget), 0, plan)
        self._admit_waiting(budget, plan)
        return plan

    def _choose_drafts(self, decoding: list[Sequence], budget: int,
                       num_prefill: int) -> DraftDecision | None:
        if self.draft_policy is None:
            return None
        spare = max(0, budget - len(decoding) - num_prefill)
        caps = [min(self._draft_cap(seq), spare) for seq in decoding]
        return self.draft_policy.choose(decoding, caps, min(num_prefill, budget))

    def _draft_cap(self, seq: Sequence) -> int:
        cap = self.config.num_speculative_tokens
        if seq.params.num_speculative_tokens is not None:
            cap = min(cap, seq.params.num_speculative_tokens)
        # drafts past max_tokens or the context end would be thrown away
        return max(0, min(cap, seq.params.max_tokens - seq.num_output_tokens - 1,
                          self.config.max_context - seq.num_tokens - 1))

    def _schedule_running(self, seq: Sequence, num_query: int, num_drafts: int,
                          plan: StepPlan) -> int:
        """Reserve slots for ``seq``, preempting others if needed; return the budget used.

        Preempting a sequence scheduled earlier in this step refunds its tokens, so the result
        can be negative.
        """
        table = seq.block_table
        assert table is not None
        refunded = 0
        while not table.can_append(num_query + num_drafts):
            if num_drafts:  # under memory pressure drop speculation before preempting anyone
                num_drafts = 0
                continue
            victim = self.running[-1]
            refunded += self._preempt(victim, plan)
            if victim is seq:
                return -refunded
        table.append(num_query + num_drafts)
        plan.scheduled.append(ScheduledSeq(seq, num_query, num_drafts))
        return num_query + num_drafts - refunded

    def _preempt(self, seq: Sequence, plan: StepPlan) -> int:
        """Free ``seq``'s blocks and send it back to waiting; return budget it had been given."""
        refunded = 0
        for i, item in enumerate(plan.scheduled):
            if item.seq is seq:
                refunded = item.num_tokens
                del plan.scheduled[i]
                break
        self.running.remove(seq)
        assert seq.block_table is not None
        seq.block_table.free()
        seq.block_table = None
        seq.num_computed = seq.num_draft_computed = 0
        seq.num_registered_blocks = seq.num_draft_marked_blocks = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        plan.preempted.append(seq)
        return refunded

    def _admit_waiting(self, budget: int, plan: StepPlan) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in plan.preempted:
                break
            hit = self.prefix.find(seq) if self.prefix is not None else NO_HIT
            num_query = min(seq.num_tokens - hit.num_tokens, budget)
            # The watermark keeps room for running sequences to grow; with none running it
            # would only stall a request whose first chunk needs the whole pool, forever.
            watermark = self.config.watermark_blocks if self.running else 0
            num_new = -(-(hit.num_tokens + num_query) // self.config.block_size) \
                - len(hit.block_ids)
            if not self.allocator.can_allocate(num_new + hit.num_evictable + watermark):
                break
            self.waiting.pop(0)
            seq.block_table = self._table_from(seq, hit)
            seq.block_table.append(num_query)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            plan.scheduled.append(ScheduledSeq(seq, num_query))
            budget -= num_query

    def _table_from(self, seq: Sequence, hit: PrefixHit) -> BlockTable:
        """A block table starting with ``hit``'s cached blocks; ``seq`` computes after them."""
        table = BlockTable(self.allocator, self.config.block_size)
        table.share_prefix(hit.block_ids)
        seq.num_computed = hit.num_tokens
        seq.num_draft_computed = hit.num_draft_tokens
        if self.prefix is not None:
            self.prefix.admit(seq, hit)
        return table

    # -- after the forward pass ----------------------------------------------------------------

    def postprocess(self, plan: StepPlan, sampled: Seq[Seq[int]]) -> list[SeqUpdate]:
        """Apply each scheduled sequence's sampled tokens (accepted drafts + one more).

        ``sampled[i]`` is empty for a prefill chunk that did not reach the end of its prompt.
        """
        updates, self._pending = self._pending, []
        for item, tokens in zip(plan.scheduled, sampled, strict=True):
            seq = item.seq
            if not item.samples:
                seq.num_computed += item.num_query_tokens
                self._register(seq)
                continue
            num_accepted = len(tokens) - 1
            # KV is valid for the query tokens and the accepted drafts; the rest is rolled back
            seq.num_computed += item.num_query_tokens + num_accepted
            assert seq.block_table is not None
            seq.block_table.truncate(seq.num_computed)
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed)
            self._register(seq)
            self._record_drafts(seq, len(item.draft_token_ids), num_accepted)
            updates.append(self._append_tokens(seq, tokens))
        return updates

    def _register(self, seq: Sequence) -> None:
        if self.prefix is not None:
            self.prefix.register(seq)

    def _record_drafts(self, seq: Sequence, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        seq.num_draft_proposed += proposed
        seq.num_draft_accepted += accepted
        if self.draft_policy is not None:
            self.draft_policy.record_acceptance(seq, proposed, accepted)

    def _append_tokens(self, seq: Sequence, tokens: Seq[int]) -> SeqUpdate:
        new_ids: list[int] = []
        text = ""
        reason = None
        final = False  # the text held back so far is final: release it
        for token in tokens:
            seq.token_ids.append(token)
            new_ids.append(token)
            grammar_ended = self._grammar_end(seq, token)
            reason = self._stop_reason(seq, token)
            if reason is None and seq.text is not None:
                delta, stopped = seq.text.push(token)
                text += delta
                reason = "stop" if stopped else None
            if reason is None:  # the grammar's end or the length limit
                reason = "stop" if grammar_ended else self._length_reason(seq)
                final = reason is not None
            if reason is not None:
                break
        if reason is None:
            return SeqUpdate(seq, new_ids, text, False, None)
        if seq.text is not None and final:
            text += seq.text.flush()
        self.running.remove(seq)
        self._finish(seq, reason)
        return SeqUpdate(seq, new_ids, text, True, reason)

    def _grammar_end(self, seq: Sequence, token: int) -> bool:
        """Move a constrained sequence's matcher past ``token``: has its grammar ended?"""
        if seq.constraint is None:
            return False
        if not seq.constraint.accept(token):  # sampling was masked: this is a bug, not input
            raise RuntimeError(f"{seq.request_id}: token {token} refused by its grammar")
        return seq.constraint.is_terminated()

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return "stop"
        return None

    def _length_reason(self, seq: Sequence) -> str | None:
        if seq.num_output_tokens >= seq.params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_context:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.block_table is not None:
            seq.block_table.free()
            seq.block_table = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)
        if self.draft_policy is not None:
            self.draft_policy.forget(seq.request_id)
