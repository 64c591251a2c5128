"""``EngineLoop`` and ``EngineThread`` driven by the scripted, torch-free ``FakeEngine``: what
each step publishes (and what it does not), rejections, stopping, the starting stats and a
broken engine. No Redis; each test runs in milliseconds.

Most tests run ``EngineLoop.run()`` on the test's own thread with a ``ScriptedCommands``
source, so every step is deterministic; the ``EngineThread`` tests wait on observable
conditions with timeouts that only bound a failing test.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from helix_daemon.engine.outputs import RequestOutput
from helix_daemon.engine_host.loop import EngineLoop, LocalClock
from helix_daemon.engine_host.messages import (
    AbortCommand,
    AddCommand,
    Command,
    Rejection,
    StepResult,
    StopCommand,
)
from helix_daemon.engine_host.thread import EngineThread
from scheduler.params import RequestParams
from tests.fake_engine import FakeEngine, expected_ids

WAIT_S = 10.0  # bounds a failing wait only; a passing test never comes near it


class ScriptedCommands:
    """A ``CommandSource`` that hands the loop one batch of commands per drain.

    Each drain takes every command of the next batch, then sees ``queue.Empty`` (an empty batch:
    a drain that found nothing). Once the batches run out it answers ``StopCommand``, so a
    scripted loop always ends."""

    def __init__(self, *batches: Sequence[Command]) -> None:
        self._batches = [list(batch) for batch in batches]
        self._current: list[Command] | None = None
        self.drains = 0  # drains that reached their end (the step after each then runs)

    def get(self, block: bool = True, timeout: float | None = None) -> Command:
        return self._next()

    def get_nowait(self) -> Command:
        return self._next()

    def batches_left(self) -> int:
        return len(self._batches)

    def _next(self) -> Command:
        if self._current is None:
            if not self._batches:
                return StopCommand()
            self._current = self._batches.pop(0)
        if self._current:
            return self._current.pop(0)
        self._current = None
        self.drains += 1
        raise queue.Empty


class CountingEngine(FakeEngine):
    """A ``FakeEngine`` that counts ``step()`` calls, that can refuse chosen request ids with a
    non-request error, and that can break on a chosen step."""

    def __init__(self, *, refuse: Sequence[str] = (), break_on_step: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_calls = 0
        self._refuse = set(refuse)
        self._break_on_step = break_on_step

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: RequestParams,
                    forced_output_ids: Sequence[int] = ()) -> None:
        if request_id in self._refuse:
            raise RuntimeError(f"cannot take {request_id}")
        super().add_request(request_id, prompt, params, forced_output_ids)

    def step(self) -> list[RequestOutput]:
        self.step_calls += 1
        if self.step_calls == self._break_on_step:
            raise RuntimeError("device lost")
        return super().step()


def add(engine_id: str, prompt: str = "one two three", max_tokens: int = 4) -> AddCommand:
    return AddCommand(engine_id, prompt, RequestParams(max_tokens=max_tokens))


def run_scripted(engine: FakeEngine, *batches: Sequence[Command], publish_stats: bool = False
                 ) -> tuple[list[StepResult], ScriptedCommands, LocalClock]:
    """Run an ``EngineLoop`` over ``batches`` on this thread; everything it published."""
    published: list[StepResult] = []
    commands = ScriptedCommands(*batches)
    clock = LocalClock()
    loop = EngineLoop(engine, commands, published.append, clock)
    if publish_stats:
        loop.publish_stats()
    loop.run()
    return published, commands, clock


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait for an observable condition (the timeout only bounds a failing test)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what}")
        time.sleep(0.002)


def engine_thread_alive(handle: EngineThread) -> bool:
    return handle._thread.is_alive()


# --- what a step publishes ---------------------------------------------------------------------


def test_a_step_that_changed_nothing_publishes_nothing_but_an_abort_that_freed_kv_does() -> None:
    """Stats-only dedup: steps that produced no output and left the stats as last published
    (idle, or a running request that made no progress) publish nothing, though the engine did
    step; a step with no output whose stats changed (an add that took KV blocks) is published,
    so a daemon waiting for room hears of it; the abort's step reports the aborted request
    with the freed KV."""
    engine = CountingEngine()
    engine.pause()  # steps make no progress: no outputs, num_steps unchanged
    published, commands, _ = run_scripted(
        engine,
        [],  # idle: nothing to step, stats as published by publish_stats
        [add("r1", max_tokens=8)],  # a step without outputs, but r1 now holds KV
        [], [],  # r1 runs and makes no progress: same stats
        [AbortCommand("r1")],  # no outputs, KV freed
        [],  # idle again
        publish_stats=True)

    assert commands.drains == 6  # six steps ran...
    assert engine.step_calls == 4  # ...four of them with r1 (or its abort) in the engine
    assert engine.aborted == ["r1"]
    assert all(not r.rejected and r.fatal is None for r in published)
    assert [[(o.request_id, o.finish_reason) for o in r.outputs] for r in published] == \
        [[], [], [("r1", "abort")]]
    stats = [r.stats for r in published]  # ...and only the three with new stats were published
    assert [(s.num_running, s.kv_blocks_used) for s in stats if s] == [(0, 0), (1, 1), (0, 0)]
    assert None not in stats


def test_every_step_with_outputs_is_published() -> None:
    """A step that produced outputs is published even when it is not the first; each carries
    the request's next tokens and the stats after that step, and the idle drain after the
    request finished publishes nothing more."""
    engine = CountingEngine()
    published, _, _ = run_scripted(engine, [add("r1", "a b", max_tokens=3)], [], [], [], [])

    assert [o.new_token_ids[0] for r in published for o in r.outputs] == expected_ids(2, 3)
    assert [r.stats.num_steps for r in published if r.stats] == [1, 2, 3]
    last = published[-1]
    assert last.outputs[0].finished and last.stats is not None and last.stats.num_running == 0
    assert engine.finished == ["r1"]


# --- rejections --------------------------------------------------------------------------------


def test_a_refused_add_becomes_a_rejection_and_the_others_keep_running() -> None:
    """``add_request`` raising a ``HelixRequestError`` (here ``InvalidRequestError``: too long
    for ``max_model_len``) becomes a ``Rejection`` with that error's code; any other exception
    becomes ``engine_error`` naming its type. Both arrive in the result of the step their drain
    preceded, and the request added alongside them runs to its end."""
    engine = CountingEngine(refuse=["boom"], max_model_len=32)
    published, _, _ = run_scripted(
        engine,
        [add("good", max_tokens=3), add("too_long", max_tokens=100), add("boom")],
        [], [])

    first = published[0]
    assert [(r.engine_id, r.code) for r in first.rejected] == [
        ("too_long", "invalid_request"), ("boom", "engine_error")]
    assert all(isinstance(r, Rejection) for r in first.rejected)
    assert "max_model_len" in first.rejected[0].message
    assert first.rejected[1].message == "RuntimeError: cannot take boom"
    assert [o.request_id for o in first.outputs] == ["good"]
    assert all(not r.rejected and r.fatal is None for r in published[1:])
    assert engine.added == ["good"] and engine.finished == ["good"]
    assert [o.new_token_ids[0] for r in published for o in r.outputs] == expected_ids(3, 3)


# --- stopping ----------------------------------------------------------------------------------


def test_a_stop_command_ends_the_loop_at_its_drain() -> None:
    """``StopCommand`` ends ``run()`` in the drain it arrives in: commands before it were
    applied, commands after it are not, and no further step runs or is published."""
    engine = CountingEngine()
    published, commands, _ = run_scripted(
        engine, [add("a", max_tokens=8)], [add("b"), StopCommand(), add("c")], [add("d")])

    assert engine.added == ["a", "b"]
    assert engine.step_calls == 1 and len(published) == 1  # the step after the first drain
    assert commands.batches_left() == 1  # the loop never drained again


def test_engine_thread_stop_joins_a_thread_that_was_stepping() -> None:
    """``EngineThread.stop()`` sends ``StopCommand`` and joins: the thread has ended when it
    returns, mid-request, and nothing is published after that."""
    published: list[StepResult] = []
    engine = FakeEngine(max_model_len=100_000)
    handle = EngineThread(engine, published.append)
    handle.start()
    handle.add(add("long", max_tokens=50_000))
    wait_until(lambda: any(r.outputs for r in published), "the request's first tokens")

    handle.stop(timeout_s=WAIT_S)

    assert not engine_thread_alive(handle)
    assert engine.finished == [] and engine.has_unfinished()  # it stopped mid-request
    count = len(published)
    handle.kill()  # a second stop has no thread left to reach
    assert len(published) == count and not handle.is_stalled(0.0)


def test_engine_thread_stop_ends_an_idle_thread() -> None:
    """An idle engine thread (blocked waiting for commands) ends on ``stop()`` too."""
    handle = EngineThread(FakeEngine(), lambda result: None)
    handle.start()
    assert engine_thread_alive(handle)
    handle.stop(timeout_s=WAIT_S)
    assert not engine_thread_alive(handle)


# --- the starting stats ------------------------------------------------------------------------


def test_publish_stats_publishes_the_engines_stats_before_any_step() -> None:
    """``publish_stats()`` publishes a result holding only the engine's current stats, before
    any step ran; a loop whose steps change nothing then publishes nothing more."""
    engine = CountingEngine()
    published, _, _ = run_scripted(engine, [], [], publish_stats=True)

    assert len(published) == 1
    only = published[0]
    assert only.stats == engine.stats() and only.stats.num_steps == 0
    assert not only.outputs and not only.rejected and only.fatal is None
    assert engine.step_calls == 0


def test_engine_thread_start_delivers_the_starting_stats_first() -> None:
    """``EngineThread.start()`` has published the engine's starting stats by the time it
    returns (here a request added before start: one running, no step yet), and that result is
    the first one, ahead of every step's."""
    published: list[StepResult] = []
    engine = FakeEngine()
    engine.add_request("early", "one two", RequestParams(max_tokens=3))
    engine.pause()  # hold the steps, so the check below sees the thread started but not stepped
    handle = EngineThread(engine, published.append)
    try:
        handle.start()
        assert len(published) == 1
        first = published[0]
        assert first.stats is not None
        assert (first.stats.num_running, first.stats.num_steps) == (1, 0)
        assert not first.outputs and not first.rejected and first.fatal is None

        engine.resume()
        wait_until(lambda: engine.finished == ["early"], "the early request to finish")
        wait_until(lambda: any(o.finished for r in published for o in r.outputs),
                   "the finishing step to be published")
        assert published[0] is first
        assert all(r.outputs for r in published[1:])
    finally:
        handle.stop(timeout_s=WAIT_S)


# --- a broken engine ---------------------------------------------------------------------------


def test_an_exception_in_step_is_published_as_fatal_and_ends_the_loop() -> None:
    """An exception from ``engine.step()`` is published as ``StepResult.fatal`` (with no
    outputs or stats: the step produced none) and ``run()`` returns without draining again,
    although commands were still waiting; the step clock is reset, so no stall is reported."""
    engine = CountingEngine(break_on_step=2)
    published, commands, clock = run_scripted(
        engine, [add("r1", max_tokens=8)], [add("r2")], [add("r3")], [])

    assert engine.step_calls == 2
    assert len(published) == 2
    assert published[0].outputs and published[0].fatal is None
    broken = published[1]
    assert isinstance(broken.fatal, RuntimeError) and str(broken.fatal) == "device lost"
    assert broken.outputs == [] and broken.stats is None
    assert engine.added == ["r1", "r2"]  # r3's batch was never drained
    assert commands.batches_left() == 2
    assert clock.value == 0.0


def test_a_broken_engine_ends_its_thread_without_a_stop() -> None:
    """In an ``EngineThread`` the fatal result is the last one published, and the thread ends
    by itself (no ``StopCommand``); a rejection drained before the break is still delivered."""
    published: list[StepResult] = []
    engine = CountingEngine(break_on_step=1, refuse=["bad"])
    handle = EngineThread(engine, published.append)
    handle.start()
    handle.add(add("bad"))  # rejected (alone or with r1's add, in the fatal result)
    handle.add(add("r1"))
    wait_until(lambda: any(r.fatal for r in published), "the fatal result")

    handle._thread.join(WAIT_S)
    assert not engine_thread_alive(handle)
    assert published[-1].fatal is not None and sum(bool(r.fatal) for r in published) == 1
    rejected = [j for r in published for j in r.rejected]
    assert [(j.engine_id, j.code) for j in rejected] == [("bad", "engine_error")]
    assert not handle.is_stalled(0.0)


async def test_engine_thread_delivers_on_an_event_loop() -> None:
    """``EngineThread.on_loop`` hands each result to ``deliver`` on the asyncio loop's own
    thread, the starting stats first, then every step's outputs."""
    loop = asyncio.get_running_loop()
    delivered: list[StepResult] = []
    threads: set[int] = set()
    done = asyncio.Event()

    def deliver(result: StepResult) -> None:
        threads.add(threading.get_ident())
        delivered.append(result)
        if any(o.finished for o in result.outputs):
            done.set()

    handle = EngineThread.on_loop(FakeEngine(), loop, deliver)
    handle.start()
    handle.add(add("r1", max_tokens=2))
    try:
        await asyncio.wait_for(done.wait(), WAIT_S)
    finally:
        await asyncio.to_thread(handle.stop, WAIT_S)

    assert threads == {threading.get_ident()}
    assert delivered[0].stats is not None and not delivered[0].outputs
    assert delivered[0].stats.num_steps == 0
    assert [o.new_token_ids[0] for r in delivered for o in r.outputs] == expected_ids(3, 2)
