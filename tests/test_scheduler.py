"""Scheduler policy without a model: admission order, budgets, preemption, validation."""

from __future__ import annotations

import pytest

from kvpool.allocator import BlockAllocator
from scheduler.errors import InvalidRequestError
from scheduler.params import RequestParams, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig


def make(num_blocks: int = 64, **config: int) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"max_context": 256, **config}), BlockAllocator(num_blocks))


def fake_step(sched: Scheduler, token: int = 7) -> list:
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
