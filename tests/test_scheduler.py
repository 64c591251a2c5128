"""Scheduler policy without a model: admission order, budgets, preemption, validation."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvpool.allocator import BlockAllocator
from kvpool.prefix_cache import PrefixCache
from scheduler.errors import InvalidRequestError
from scheduler.params import RequestParams, SamplingParams
from scheduler.scheduler import (
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SeqUpdate,
    StepPlan,
)
from scheduler.sequence import Sequence, SequenceStatus
from scheduler.speculation import DraftDecision


def make(num_blocks: int = 64, **config: int) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"max_context": 256, **config}), BlockAllocator(num_blocks))


def fake_step(sched: Scheduler, token: int = 7) -> tuple[StepPlan, list[SeqUpdate]]:
    """Schedule, then pretend the model sampled ``token`` for every sequence that samples."""
    plan = sched.schedule()
    sampled = [[token] if item.samples else [] for item in plan.scheduled]
    return plan, sched.postprocess(plan, sampled)


@pytest.mark.parametrize("prompt,params,message", [
    ([], RequestParams(), "empty"),
    ([1] * 250, RequestParams(max_tokens=10), "context"),
    ([1], RequestParams(max_tokens=0), "max_tokens"),
    ([1], RequestParams(sampling=SamplingParams(temperature=-1)), "temperature"),
    ([1], RequestParams(sampling=SamplingParams(top_p=0.0)), "top_p"),
    ([1], RequestParams(sampling=SamplingParams(top_p=1.5)), "top_p"),
    ([1] * 100, RequestParams(max_tokens=100), "never fit"),
])
def test_bad_requests_get_typed_errors(prompt: list[int], params: RequestParams,
                                       message: str) -> None:
    """Each invalid request raises InvalidRequestError naming the problem; others still run."""
    sched = make(num_blocks=8, block_size=16)
    with pytest.raises(InvalidRequestError, match=message):
        sched.add("bad", prompt, params)
    sched.add("good", [1, 2, 3], RequestParams(max_tokens=2))
    fake_step(sched)
    _, updates = fake_step(sched)
    assert updates[0].finished and updates[0].seq.request_id == "good"
    sched.allocator.check_integrity(sched.block_tables())
    assert sched.allocator.num_free == 8


def test_priority_then_arrival_order() -> None:
    """With room for one sequence, the lowest priority value runs first, then the earliest."""
    sched = make(max_num_seqs=1, max_num_batched_tokens=64)
    sched.add("late-urgent", [1, 2], RequestParams(max_tokens=1, priority=-1))
    sched.add("early", [1, 2], RequestParams(max_tokens=1))
    sched.add("urgent-2", [1, 2], RequestParams(max_tokens=1, priority=-1))
    order = []
    while sched.has_unfinished():
        _, updates = fake_step(sched)
        order += [u.seq.request_id for u in updates if u.finished]
    assert order == ["late-urgent", "urgent-2", "early"]


def test_long_prompt_is_prefilled_in_chunks_beside_decodes() -> None:
    """A 100-token prompt under a 24-token budget runs in chunks while another sequence decodes."""
    sched = make(max_num_batched_tokens=24)
    sched.add("short", [1, 2, 3], RequestParams(max_tokens=20))
    fake_step(sched)
    sched.add("long", list(range(1, 101)), RequestParams(max_tokens=1))
    chunks = []
    while any(s.request_id == "long" for s in sched.waiting + sched.running):
        plan, _ = fake_step(sched)
        assert plan.num_tokens <= 24
        ids = {item.seq.request_id: item.num_query_tokens for item in plan.scheduled}
        assert ids.get("short") == 1  # the decode is never starved by the prefill
        chunks.append(ids.get("long", 0))
    assert sum(chunks) == 100 and max(chunks) == 23


def test_pool_exhaustion_preempts_newest_instead_of_failing() -> None:
    """When blocks run out, the newest sequence is preempted (recompute), never an error."""
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=64, watermark_blocks=0)
    for i in range(3):
        sched.add(f"s{i}", [1] * 7, RequestParams(max_tokens=12))
    finished = set()
    for _ in range(200):
        _, updates = fake_step(sched)
        finished |= {u.seq.request_id for u in updates if u.finished}
        sched.allocator.check_integrity(sched.block_tables())
        if not sched.has_unfinished():
            break
    assert finished == {"s0", "s1", "s2"}
    assert sched.num_preemptions > 0
    assert sched.allocator.num_free == 6


def test_abort_frees_blocks_at_once() -> None:
    """Aborting a running request frees its blocks immediately and reports it finished."""
    sched = make()
    sched.add("a", [1] * 40, RequestParams(max_tokens=50))
    fake_step(sched)
    assert sched.allocator.num_used > 0
    assert sched.abort("a")
    assert sched.allocator.num_used == 0
    _, updates = fake_step(sched)
    assert [(u.seq.request_id, u.finish_reason) for u in updates] == [("a", "abort")]
    assert not sched.has_unfinished()


def test_a_request_that_fits_the_pool_runs_despite_the_watermark() -> None:
    """A request validation accepts (11 prompt + 1 output tokens: 3 blocks of 4, in a 3-block
    pool) runs once nothing else holds blocks: the watermark only keeps room for running
    sequences, and there are none. Found by SchedulerMachine: admission used to add the watermark
    even then, and such a request waited for ever."""
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=16, watermark_blocks=1)
    sched.add("whole-pool", [2] * 11, RequestParams(max_tokens=1))
    _, updates = fake_step(sched)
    assert [(u.seq.request_id, u.finish_reason) for u in updates] == [("whole-pool", "length")]


# -- a state machine over the public API -------------------------------------------------------

EOS, STOP = 0, 1  # EOS stops unless ignore_eos; STOP stops requests that list it
TOKENS = st.integers(EOS, 9)  # 2..9 are plain tokens


class FixedDrafts:
    """The simplest draft policy: K slots (at most each sequence's cap) for every decode."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, seqs: Seq[Sequence], caps: Seq[int],
               num_other_tokens: int) -> DraftDecision:
        return DraftDecision([min(self.k, cap) for cap in caps])

    def record_acceptance(self, seq: Sequence, proposed: int, accepted: int) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass


class SchedulerMachine(RuleBasedStateMachine):
    """Requests of random sizes and priorities (long prompts are chunked), aborts, forced
    output and speculative steps with fake tokens, over a pool so small that sequences are
    preempted. After every rule the pool is intact and each sequence's reserved KV equals its
    computed tokens; at the end every request, preempted ones included, finishes exactly once
    with its tokens intact, and every block is back in the pool.

    With a prefix cache (most examples), prompts share prefixes (and salts split them): a
    shadow KV (the token id each slot was last written with) shows every running sequence
    attends to exactly its own tokens, so a hit serves the right content and no block is
    written while another sequence reads it; written blocks are held by their writer alone."""

    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler
        self.seqs: dict[str, Sequence] = {}
        self.expected: dict[str, list[int]] = {}  # token ids each sequence must hold
        self.num_forced: dict[str, int] = {}
        self.finished: dict[str, str | None] = {}  # request id -> reason of its final update
        self.closed: set[str] = set()  # finished, aborted or done on arrival
        self.aborted: set[str] = set()
        self.preempted: set[str] = set()
        self.shadow: dict[int, int] = {}  # slot -> token id whose "KV" was last written there

    @initialize(num_blocks=st.integers(3, 12), block_size=st.sampled_from([1, 2, 4]),
                budget=st.integers(2, 24), max_num_seqs=st.integers(1, 5), k=st.integers(0, 3),
                watermark=st.integers(0, 1), max_context=st.integers(8, 48),
                caching=st.sampled_from([True, True, True, False]))
    def configure(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int,
                  k: int, watermark: int, max_context: int, caching: bool) -> None:
        config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                 block_size=block_size, max_context=max_context,
                                 num_speculative_tokens=k, watermark_blocks=watermark)
        allocator = BlockAllocator(num_blocks, PrefixCache() if caching else None)
        self.sched = Scheduler(config, allocator, eos_token_ids=[EOS],
                               draft_policy=FixedDrafts(k))

    # -- rules ---------------------------------------------------------------------------------

    @rule(data=st.data(), priority=st.integers(-1, 1), spec=st.sampled_from([None, 0, 1, 2]),
          ignore_eos=st.booleans(), stops=st.booleans(), family=st.integers(0, 2),
          salt=st.sampled_from([None, None, "t2"]), caching=st.sampled_from([True, True, False]))
    def add(self, data: st.DataObject, priority: int, spec: int | None, ignore_eos: bool,
            stops: bool, family: int, salt: str | None, caching: bool) -> None:
        """A request sized to the pool and context (one in ten too big: refused); prompts
        longer than the step budget are prefilled in chunks. Prompts of one family share
        their prefixes; some requests carry a salt or opt out of caching."""
        config = self.sched.config
        room = min(config.max_context, self.sched.allocator.num_blocks * config.block_size)
        if data.draw(st.integers(0, 9), label="oversized") == 0:
            total = data.draw(st.integers(room + 1, room + 4), label="total")
        else:
            total = data.draw(st.integers(2, room), label="total")
        prompt_len = data.draw(st.integers(1, total - 1), label="prompt_len")
        max_tokens = total - prompt_len
        num_forced = data.draw(st.one_of(st.just(0), st.integers(0, max_tokens + 1)),
                               label="num_forced")
        rid = f"r{len(self.seqs)}"
        prompt = [2 + (i * (family + 1)) % 8 for i in range(prompt_len)]
        forced = [2 + i % 8 for i in range(num_forced)]
        params = RequestParams(max_tokens=max_tokens, priority=priority, ignore_eos=ignore_eos,
                               stop_token_ids=(STOP,) if stops else (),
                               num_speculative_tokens=spec, cache_salt=salt,
                               prefix_caching=caching)
        if total > room:
            with pytest.raises(InvalidRequestError):
                self.sched.add(rid, prompt, params, forced)
            return
        self.seqs[rid] = self.sched.add(rid, prompt, params, forced)
        self.expected[rid] = prompt + forced
        self.num_forced[rid] = num_forced
        if num_forced >= max_tokens:  # already done: its final update comes with the next step
            self.closed.add(rid)

    @rule(data=st.data(), num_steps=st.integers(1, 4))
    def step(self, data: st.DataObject, num_steps: int) -> None:
        """Schedule, draft some of the slots, accept a prefix of the drafts plus one token."""
        def drafts(n: int) -> list[int]:
            return data.draw(st.lists(TOKENS, max_size=n))

        def sample(item: ScheduledSeq) -> list[int]:
            accepted = data.draw(st.integers(0, len(item.draft_token_ids)))
            return item.draft_token_ids[:accepted] + [data.draw(TOKENS)]

        for _ in range(num_steps):
            self._step(drafts, sample)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Abort a request (live, finished or unknown); only a live one says True."""
        rid = data.draw(st.sampled_from([*sorted(self.seqs), "no-such-request"]))
        live = rid in self.seqs and rid not in self.closed
        assert self.sched.abort(rid) is live
        if live:
            assert self.seqs[rid].block_table is None  # its blocks are free at once
            self.closed.add(rid)
            self.aborted.add(rid)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def kv_matches_computed_tokens(self) -> None:
        sched = self.sched
        sched.allocator.check_integrity(sched.block_tables())
        for seq in sched.running:
            table = seq.block_table
            assert seq.status is SequenceStatus.RUNNING and table is not None
            assert table.num_tokens == seq.num_computed, seq
            assert len(table.block_ids) == -(-seq.num_computed // sched.config.block_size)
            assert seq.num_uncomputed >= 1, seq  # every running sequence has a next token
        for seq in sched.waiting:
            assert seq.status is SequenceStatus.WAITING
            assert seq.block_table is None and seq.num_computed == 0, seq
        # shared prefix blocks count once
        assert len({b for t in sched.block_tables() for b in t}) == sched.allocator.num_used
        assert len(sched.running) <= sched.config.max_num_seqs
        for queue in (sched.waiting, sched.running):
            assert [s.sort_key for s in queue] == sorted(s.sort_key for s in queue)

    @invariant()
    def live_requests_are_queued_once(self) -> None:
        queued = [s.request_id for s in self.sched.waiting + self.sched.running]
        assert sorted(queued) == sorted(set(self.seqs) - self.closed)

    def teardown(self) -> None:
        """Run to the end (plain tokens, at most one draft accepted): everything finishes."""
        if not hasattr(self, "sched"):
            return
        idle = 0
        for _ in range(10_000):
            if not self.sched.has_unfinished():
                break
            plan = self._step(lambda n: [2] * n, lambda item: item.draft_token_ids[:1] + [3])
            self.kv_matches_computed_tokens()
            # Nothing scheduled twice in a row (the first may only deliver pending updates):
            # the scheduler is deterministic and nothing frees a block, so it is stuck.
            idle = 0 if plan.scheduled else idle + 1
            assert idle < 2, f"stuck: waiting {self.sched.waiting}, running {self.sched.running}"
        else:
            raise AssertionError(f"no end in sight: waiting {self.sched.waiting}, "
                                 f"running {self.sched.running}")
        assert set(self.finished) == set(self.seqs)  # the preempted ones came back too
        # every block is free: never-cached, or cached and evictable
        assert self.sched.allocator.num_free == self.sched.allocator.num_blocks
        self.sched.allocator.check_integrity()

    # -- one step and its checks ---------------------------------------------------------------

    def _step(self, drafts: Callable[[int], list[int]],
              sample: Callable[[ScheduledSeq], list[int]]) -> StepPlan:
        plan = self.sched.schedule()
        self._check_plan(plan)
        sampled = []
        for item in plan.scheduled:
            if item.num_draft_slots:
                item.draft_token_ids = drafts(item.num_draft_slots)
            self._write_shadow(item)
            sampled.append(sample(item) if item.samples else [])
        updates = self.sched.postprocess(plan, sampled)
        self._check_updates(plan, sampled, updates)
        self.attends_to_own_tokens()
        return plan

    def _write_shadow(self, item: ScheduledSeq) -> None:
        """The "forward pass": write each query and draft token's id into its slot, after
        checking nobody else holds (or may hit) the blocks written."""
        seq, table = item.seq, item.seq.block_table
        assert table is not None
        allocator, size = self.sched.allocator, table.block_size
        for block_id in table.block_ids[seq.num_computed // size:]:
            assert allocator.ref_count(block_id) == 1, (seq, block_id)
            cache = allocator.prefix_cache
            assert cache is None or not cache.is_cached(block_id), (seq, block_id)
        tokens = seq.token_ids[seq.num_computed: seq.num_computed + item.num_query_tokens]
        for offset, token in enumerate(tokens + item.draft_token_ids):
            self.shadow[table.slot(seq.num_computed + offset)] = token

    @invariant()
    def attends_to_own_tokens(self) -> None:
        """Every computed position of a running sequence holds its own token (hits included)."""
        for seq in self.sched.running:
            assert seq.block_table is not None
            for pos in range(seq.num_computed):
                assert self.shadow.get(seq.block_table.slot(pos)) == seq.token_ids[pos], seq

    def _draft_cap(self, seq: Sequence) -> int:
        config, params = self.sched.config, seq.params
        caps = [config.num_speculative_tokens, params.max_tokens - seq.num_output_tokens - 1,
                config.max_context - seq.num_tokens - 1]
        if params.num_speculative_tokens is not None:
            caps.append(params.num_speculative_tokens)
        return max(0, min(caps))

    def _check_plan(self, plan: StepPlan) -> None:
        sched = self.sched
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        scheduled = [item.seq for item in plan.scheduled]
        assert len({id(s) for s in scheduled}) == len(scheduled)
        for item in plan.scheduled:
            seq, table = item.seq, item.seq.block_table
            assert seq.status is SequenceStatus.RUNNING and table is not None
            assert 1 <= item.num_query_tokens <= seq.num_uncomputed
            # KV is reserved for exactly the tokens this step computes
            assert table.num_tokens == seq.num_computed + item.num_tokens
            if item.num_draft_slots:
                assert item.num_query_tokens == 1 and item.samples
                assert item.num_draft_slots <= self._draft_cap(seq)
        for seq in plan.preempted:
            assert seq.status is SequenceStatus.WAITING and seq not in scheduled
            assert seq.block_table is None and seq.num_computed == 0
            assert seq.token_ids == self.expected[seq.request_id]  # its output is kept
            self.preempted.add(seq.request_id)
        for seq in sched.running:
            if seq not in scheduled:
                assert seq.block_table is not None
                assert seq.block_table.num_tokens == seq.num_computed
        sched.allocator.check_integrity(sched.block_tables())

    def _check_updates(self, plan: StepPlan, sampled: list[list[int]],
                       updates: list[SeqUpdate]) -> None:
        # (``item.samples`` is stale now: postprocess advanced the sequences; a sampling item
        # got at least one token)
        tokens_of = {id(item.seq): tokens for item, tokens in zip(plan.scheduled, sampled)
                     if tokens}
        assert len([u for u in updates if id(u.seq) in tokens_of]) == len(tokens_of)
        for update in updates:
            seq, rid = update.seq, update.seq.request_id
            assert rid not in self.finished  # nothing after a request's final update
            tokens = tokens_of.get(id(seq), [])
            assert update.new_token_ids == tokens[:len(update.new_token_ids)]
            self.expected[rid] += update.new_token_ids
            assert seq.token_ids == self.expected[rid]
            limit = max(seq.params.max_tokens, self.num_forced[rid])
            assert seq.num_output_tokens <= limit
            stops = [self._stops(seq, t) for t in update.new_token_ids]
            if not update.finished:
                assert update.new_token_ids == tokens and not any(stops)
                assert update.finish_reason is None and seq.status is SequenceStatus.RUNNING
                continue
            assert not any(stops[:-1])  # tokens after a stop are dropped
            self._check_finish_reason(update, stops)
            assert seq.block_table is None and seq.status is SequenceStatus.FINISHED
            self.finished[rid] = update.finish_reason
            self.closed.add(rid)

    def _stops(self, seq: Sequence, token: int) -> bool:
        return token in seq.params.stop_token_ids or (token == EOS and not seq.params.ignore_eos)

    def _check_finish_reason(self, update: SeqUpdate, stops: list[bool]) -> None:
        seq, reason = update.seq, update.finish_reason
        if reason == "abort":
            assert seq.request_id in self.aborted and not update.new_token_ids
        elif reason == "stop":
            assert stops and stops[-1]
        else:
            assert reason == "length"
            assert seq.num_output_tokens >= seq.params.max_tokens \
                or seq.num_tokens >= self.sched.config.max_context


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
