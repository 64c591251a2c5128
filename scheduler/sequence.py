"""One request's tokens and lifecycle: waiting -> running -> finished (preempted -> waiting)."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Protocol

from kvpool.block_table import BlockTable
from scheduler.params import RequestParams

if TYPE_CHECKING:  # the matcher's protocol mentions torch; sequences themselves do without it
    from scheduler.grammar import TokenConstraint


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class TextStream(Protocol):
    """Incremental text of one sequence: ``push`` a token, get its text delta and a stop flag."""

    def push(self, token_id: int) -> tuple[str, bool]: ...

    def flush(self) -> str: ...


class Sequence:
    """Prompt plus output tokens, how many of them have KV in the pool, and where it lives."""

    def __init__(self, request_id: str, prompt_ids: Seq[int], params: RequestParams,
                 arrival: int, forced_output_ids: Seq[int] = (),
                 text: TextStream | None = None,
                 constraint: TokenConstraint | None = None) -> None:
        self.request_id = request_id
        self.params = params
        self.arrival = arrival
        self.num_prompt_tokens = len(prompt_ids)
        # a resumed request continues after output it already streamed: that output is forced
        self.token_ids: list[int] = [*prompt_ids, *forced_output_ids]
        self.num_forced_tokens = len(forced_output_ids)
        self.num_computed = 0  # tokens whose KV is in the pool
        self.num_draft_computed = 0  # tokens whose draft-model KV is in the pool
        self.status = SequenceStatus.WAITING
        self.block_table: BlockTable | None = None
        self.finish_reason: str | None = None
        self.text = text
        # structured output: the grammar's matcher, past every token of the output so far (kept
        # through preemption, since recompute keeps the tokens)
        self.constraint = constraint
        self.num_preemptions = 0
        self.num_draft_proposed = 0
        self.num_draft_accepted = 0
        # prefix caching: None = this request neither reads nor writes the cache; else the extra
        # key its blocks are hashed with (its cache_salt)
        self.cache_key: bytes | None = params.cache_key
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks, as far as known
        self.num_registered_blocks = 0  # leading blocks of its table already in the cache
        self.num_draft_marked_blocks = 0  # leading blocks marked as holding draft-model KV
        self.num_cached_tokens: int | None = None  # prompt tokens its first admission reused

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.params.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model: a prompt (chunk) or the last sampled token."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed})")
