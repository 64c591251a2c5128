"""A scripted, torch-free engine for the daemon's own logic (claims, head starts, flushes,
retires), so it is tested in milliseconds.

``FakeEngine`` satisfies ``engine_host.protocols.StepEngine``, what ``EngineLoop`` drives
(``add_request``, ``abort``, ``step``, ``has_unfinished``, ``stats``, ``info``). Each request
produces one token per step: the token at output position ``k`` depends only on the prompt's
length and ``k``, so a request resumed from forced output ids continues exactly where it
stopped. It finishes with ``length`` after ``max_tokens``. The engine runs in the daemon's
engine thread; tests read what it recorded (``added``, ``aborted``, ``finished``) from the
loop, which only ever sees whole updates.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from helix_daemon.engine.outputs import EngineInfo, EngineStats, RequestOutput
from scheduler.errors import InvalidRequestError
from scheduler.params import RequestParams

BLOCK_SIZE = 16
_PAUSED_STEP_S = 0.005  # a paused engine naps so its thread does not spin


def token_at(num_prompt_tokens: int, position: int) -> int:
    """The token a fake request emits at output ``position``."""
    return 100 + num_prompt_tokens + position


def text_of(token_id: int) -> str:
    return f" w{token_id}"


@dataclass
class _Running:
    num_prompt_tokens: int
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """Scripted engine: ``tokens_per_step`` tokens a step per request, until ``max_tokens``."""

    def __init__(self, num_kv_blocks: int = 64, max_model_len: int = 256,
                 tokens_per_step: int = 1) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = max_model_len
        self.tokens_per_step = tokens_per_step
        self.added: list[str] = []  # engine ids, in the order they were added
        self.aborted: list[str] = []  # engine ids aborted while they ran
        self.finished: list[str] = []  # engine ids that reached max_tokens
        self._running: dict[str, _Running] = {}
        self._aborts: list[RequestOutput] = []  # reported by the next step, as the engine does
        self._num_steps = 0
        self._resumed = threading.Event()
        self._resumed.set()

    # --- what tests control -----------------------------------------------------------------

    def pause(self) -> None:
        """Steps make no progress until ``resume`` (requests stay running; aborts are still
        reported)."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    # --- the engine duck type ---------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: RequestParams,
                    forced_output_ids: Sequence[int] = ()) -> None:
        params.validate()
        num_prompt = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
        if num_prompt + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(f"{num_prompt} + {params.max_tokens} tokens exceed "
                                      f"max_model_len {self.max_model_len}")
        self._running[request_id] = _Running(num_prompt, params.max_tokens,
                                              list(forced_output_ids))
        self.added.append(request_id)

    def abort(self, request_id: str) -> bool:
        run = self._running.pop(request_id, None)
        if run is None:
            return False
        self.aborted.append(request_id)
        self._aborts.append(RequestOutput(request_id, [], "", True, "abort",
                                          run.num_prompt_tokens, len(run.output_ids), 0, 0))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._running or self._aborts)

    def step(self) -> list[RequestOutput]:
        aborted, self._aborts = self._aborts, []
        if not self._resumed.wait(_PAUSED_STEP_S):
            return aborted  # paused: no progress, but an abort is still reported
        self._num_steps += 1
        outputs = [self._advance(request_id, run) for request_id, run in self._running.items()]
        for output in outputs:
            if output.finished:
                del self._running[output.request_id]
                self.finished.append(output.request_id)
        return aborted + outputs

    def stats(self) -> EngineStats:
        used = sum(-(-(r.num_prompt_tokens + len(r.output_ids)) // BLOCK_SIZE)
                   for r in self._running.values())
        return EngineStats(num_running=len(self._running), num_waiting=0, kv_blocks_used=used,
                           kv_blocks_total=self.num_kv_blocks, num_preemptions=0,
                           num_steps=self._num_steps, num_draft_proposed=0,
                           num_draft_accepted=0, peak_kv_blocks_used=used,
                           kv_slots_allocated=0, kv_slots_used=0)

    def info(self) -> EngineInfo:
        return EngineInfo(device="fake", kv_blocks=self.num_kv_blocks, kv_block_size=BLOCK_SIZE,
                          kv_bytes=0, linear_form=None)

    def _advance(self, request_id: str, run: _Running) -> RequestOutput:
        room = run.max_tokens - len(run.output_ids)
        new = [token_at(run.num_prompt_tokens, len(run.output_ids) + i)
               for i in range(min(self.tokens_per_step, room))]
        run.output_ids.extend(new)
        finished = len(run.output_ids) >= run.max_tokens
        return RequestOutput(request_id, new, "".join(map(text_of, new)), finished,
                             "length" if finished else None, run.num_prompt_tokens,
                             len(run.output_ids), 0, 0)


def expected_ids(num_prompt_tokens: int, max_tokens: int) -> list[int]:
    """Every token a fake request of this size streams, start to end."""
    return [token_at(num_prompt_tokens, k) for k in range(max_tokens)]
