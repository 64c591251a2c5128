"""The sampler's side of structured output: token masks from each constrained sequence's matcher,
applied to the logits before sampling.

A ``TokenConstraint`` (one per request; built by the engine from a compiled grammar) says which
tokens may come next. A step with constrained rows fills one bitmask with a row per constrained
logits row (bit ``t % 32`` of word ``t // 32`` allows token ``t``), from their matchers, and sets
those rows' disallowed logits to -inf in place, so greedy takes the best allowed token and
sampling draws from the distribution renormalised over the allowed ones. Unconstrained rows are
never touched, and a step without a constrained row does no mask work at all.

Speculation: a draft row's mask is the matcher's after the drafts before it (accepted, masked,
then rolled back), so the verifier's p at every position is the constrained distribution; with
the draft model's q masked the same way, rejection sampling stays lossless for it. Drafts the
grammar refuses (n-gram proposals) are cut before the forward, and tokens enter a matcher for good
only in ``Scheduler.postprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class TokenConstraint(Protocol):
    """One request's grammar state (a matcher over the tokens accepted so far)."""

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32 words; covers the model's
        whole logits width, tokens past the tokenizer's vocabulary disallowed)."""
        ...

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar refuses it (the matcher may then be
        unusable: pass only tokens its mask allowed, or ones ``num_valid`` counted)."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""
        ...

    def num_valid(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the grammar would accept from here (state unchanged)."""
        ...

    def is_terminated(self) -> bool:
        """True once the grammar has ended: no token may follow."""
        ...


class Drafted(Protocol):
    """A sequence's share of a step as masking sees it (``ScheduledSeq`` satisfies it)."""

    @property
    def constraint(self) -> TokenConstraint | None: ...

    draft_token_ids: list[int]


def allocate_bitmask(rows: int, vocab: int) -> torch.Tensor:
    """``[rows, ceil(vocab / 32)]`` int32 words, every token allowed."""
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[N, V]`` with the tokens ``bitmask`` ``[N, W]`` disallows set to -inf (out of
    place: the forward's logits are inference tensors). Ids past ``32 W`` stay as they are."""
    vocab = logits.shape[-1]
    # numpy unpacks bits fastest (C); little-endian words make bit t%32 of word t//32 token t
    bits = np.unpackbits(bitmask.numpy().astype("<i4", copy=False).view(np.uint8), axis=1,
                         bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(bits).to(logits.device, torch.bool)
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=True)
    return torch.where(allowed, logits, float("-inf"))


def fill_along(constraint: TokenConstraint, drafts: Sequence[int], bitmask: torch.Tensor,
               first_row: int) -> None:
    """Masks of ``len(drafts) + 1`` positions: now, then after each draft (the verify rows).
    The drafts must be ones the grammar accepts (``trim_drafts``); the matcher ends unchanged."""
    constraint.fill_mask(bitmask, first_row)
    taken = 0
    for i in range(len(drafts)):
        taken += _advance(constraint, drafts[i: i + 1])
        constraint.fill_mask(bitmask, first_row + i + 1)
    constraint.rollback(taken)


def _advance(constraint: TokenConstraint, drafts: Sequence[int]) -> int:
    """Accept ``drafts`` up to the grammar's end (what follows it is never kept); return how
    many were accepted."""
    for taken, token in enumerate(drafts):
        if constraint.is_terminated():
            return taken
        if not constraint.accept(token):
            raise RuntimeError(f"draft {token} refused by the grammar it was masked or cut with")
    return len(drafts)


def mask_rows(items: Sequence[Drafted], logits: torch.Tensor,
              with_drafts: bool) -> torch.Tensor:
    """Mask the logits of every constrained item, in place; without one, nothing is done at all.

    ``with_drafts``: each item owns ``len(draft_token_ids) + 1`` consecutive rows (verification);
    else one row each, the position after its drafts so far (a draft model's next pass). Only
    the constrained items' rows are read and written: unconstrained rows cost nothing.
    """
    spans: list[tuple[TokenConstraint, Sequence[int], int, int]] = []  # constraint, drafts, rows
    row = 0
    for item in items:
        num_rows = len(item.draft_token_ids) + 1 if with_drafts else 1
        if item.constraint is not None:
            spans.append((item.constraint, item.draft_token_ids, row, num_rows))
        row += num_rows
    if not spans:
        return logits
    rows = torch.cat([torch.arange(first, first + n) for _, _, first, n in spans])
    bitmask = allocate_bitmask(len(rows), logits.shape[-1])
    local = 0
    for constraint, drafts, _, num_rows in spans:
        if with_drafts:
            fill_along(constraint, drafts, bitmask, local)
        else:
            _fill_after(constraint, drafts, bitmask, local)
        local += num_rows
    rows = rows.to(logits.device)
    masked = apply_bitmask(logits.index_select(0, rows), bitmask)
    with torch.inference_mode():  # the forward's logits are inference tensors
        logits.index_copy_(0, rows, masked)
    return logits


def _fill_after(constraint: TokenConstraint, drafts: Sequence[int], bitmask: torch.Tensor,
                row: int) -> None:
    """The mask after ``drafts`` (a draft model's proposals so far, drawn under the mask)."""
    taken = _advance(constraint, drafts)
    constraint.fill_mask(bitmask, row)
    constraint.rollback(taken)


def trim_drafts(items: Sequence[Drafted]) -> None:
    """Cut each constrained item's drafts at the first token its grammar refuses (the target
    would give it probability 0): n-gram proposals know nothing of the grammar."""
    for item in items:
        if item.constraint is not None and item.draft_token_ids:
            del item.draft_token_ids[item.constraint.num_valid(item.draft_token_ids):]
