"""What crosses the engine boundary: commands from the daemon to its engine, and one
``StepResult`` back per step. Torch-free, so the daemon side never loads the model's libraries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from helix_daemon.engine.chat import ChatPrompt
from helix_daemon.engine.outputs import EngineStats, RequestOutput
from scheduler.params import RequestParams


@dataclass(frozen=True, slots=True)
class AddCommand:
    engine_id: str
    prompt: str | list[int] | ChatPrompt
    params: RequestParams
    forced_output_ids: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class AbortCommand:
    engine_id: str


@dataclass(frozen=True, slots=True)
class StopCommand:
    """Finish the current step and end the engine's loop."""


Command = AddCommand | AbortCommand | StopCommand


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the engine would not take, with the wire error code it answers."""

    engine_id: str
    code: str
    message: str


@dataclass(slots=True)
class StepResult:
    """Everything one iteration produced."""

    outputs: list[RequestOutput] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    stats: EngineStats | None = None
    fatal: BaseException | None = None
