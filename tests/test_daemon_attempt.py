"""Attempt bookkeeping: seq/offset assignment, coalescing of unsent tokens, one terminal event."""

from __future__ import annotations

from helix_daemon.server.attempts import Attempt
from helix_daemon.wire import protocol as p


def make(next_seq: int = 0, next_off: int = 0) -> Attempt:
    return Attempt("r", "1-0", "d", epoch=2, attempts=2, next_seq=next_seq, next_off=next_off,
                   result_ttl_ms=1000, queue_wait_s=0.0)


def test_unsent_tokens_coalesce_into_one_event() -> None:
    """Steps that pile up before a flush become one token event with contiguous offsets."""
    a = make(next_seq=3, next_off=10)
    a.add_tokens([1, 2], "ab")
    a.add_tokens([3], "c")
    [op] = a.pending
    assert isinstance(op.event, p.TokenEvent)
    assert (op.event.seq, op.event.off, op.event.ids, op.event.text) == (3, 10, [1, 2, 3], "abc")
    assert (op.off, op.off_after, a.next_seq, a.next_off) == (10, 13, 4, 13)


def test_sent_writes_are_frozen() -> None:
    """Once a write was attempted its seq and content never change: new tokens get a new seq."""
    a = make()
    a.add_tokens([1], "a")
    a.pending[0].attempted = True
    a.add_tokens([2], "b")
    assert [(o.event.seq, o.event.ids) for o in a.pending] == [(0, [1]), (1, [2])]


def test_one_terminal_event_and_nothing_after_it() -> None:
    """The first terminal wins; later tokens or terminals are ignored."""
    a = make()
    a.add_tokens([1], "a")
    a.cancel("bye")
    a.add_tokens([2], "b")
    a.fail("timeout", "late")
    a.done("stop")
    assert [type(o.event) for o in a.pending] == [p.TokenEvent, p.CancelledEvent]
    terminal = a.pending[-1]
    assert terminal.terminal_state == "cancelled" and terminal.event.seq == 1
    assert terminal.ttl_ms == 1000 and a.outcome == "cancelled"


def test_done_reports_usage_and_timings() -> None:
    """done carries usage and timings (attempts, acceptance rate only with speculation)."""
    a = make()
    a.num_prompt_tokens, a.num_output_tokens = 4, 7
    a.add_tokens([1, 2], "xy")
    a.done("length")
    event = a.pending[-1].event
    assert isinstance(event, p.DoneEvent) and event.finish_reason == "length"
    assert event.usage == p.Usage(4, 7)
    assert event.timings.attempts == 2 and event.timings.acceptance_rate is None
    assert a.engine_id == "r@2"
