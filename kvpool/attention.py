"""Paged attention in plain torch: write new K/V into slots, attend against each sequence's blocks.

A step's tokens arrive packed: one row per scheduled token of every sequence, prefill chunks and
decode (or speculative verify) tokens mixed. Sequences with short queries (decode, verify) run as
one padded, masked batch per layer, with no Python loop over them. Long prefill chunks run one per
sequence: there are few of them and padding every decode row to a chunk's length would waste more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Queries up to this length join the padded batch (covers decode plus K+1 speculative verify).
MAX_BATCHED_QUERY_LEN = 16
# Short-query sequences are padded to the longest context of their group; a sequence whose
# context is shorter than this fraction of the group's longest starts a new group, so gathered
# keys stay close to the real ones (in a mixed workload one padded group gathers ~2x too many).
MIN_GROUP_FILL = 0.6


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """Where one sequence's scheduled tokens sit in the packed batch and in its KV."""

    query_start: int  # first row of this sequence in the packed batch
    query_len: int
    context_len: int  # tokens in KV once this step's tokens are written
    block_ids: Sequence[int]


@dataclass(slots=True)
class BatchedGroup:
    """Short-query sequences as a padded batch: B sequences, Q query rows, S key slots."""

    token_index: torch.Tensor  # [B, Q] packed row of each query (0 for padding)
    valid: torch.Tensor  # [B * Q] bool, real queries
    valid_index: torch.Tensor  # [N] positions of the real queries in B * Q (no boolean indexing)
    dest_rows: torch.Tensor  # [N] packed row of each real query
    block_index: torch.Tensor  # [B, NB] block ids to gather (0 for padding)
    query_pos: torch.Tensor  # [B, Q] absolute position of each query
    context_len: torch.Tensor  # [B]
    block_size: int
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, Q, S] bool: key visible to query (causal, inside context and sliding window)."""
        if window not in self._masks:
            num_keys = self.block_index.shape[1] * self.block_size
            key_pos = torch.arange(num_keys, device=self.query_pos.device)
            q = self.query_pos[:, :, None]
            visible = (key_pos <= q) & (key_pos < self.context_len[:, None, None])
            if window is not None:
                visible &= q - key_pos < window
            # padding rows see key 0 so that softmax stays finite; their output is discarded
            visible[:, :, 0] |= ~self.valid.view_as(self.query_pos)
            self._masks[window] = visible[:, None]
        return self._masks[window]


@dataclass(frozen=True, slots=True)
class LongQuery:
    """One sequence's prefill chunk, attended on its own."""

    query_start: int
    query_len: int
    context_len: int
    block_index: torch.Tensor  # [NB]


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs for one packed forward; built once per step, used by every layer."""

    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor  # [T] slot each new token's K/V is written to
    batched: list[BatchedGroup]
    long_queries: list[LongQuery]


def build_metadata(
    spans: Sequence[SeqSpan], block_size: int, device: torch.device
) -> AttentionMetadata:
    slot_mapping: list[int] = []
    short: list[SeqSpan] = []
    long: list[SeqSpan] = []
    for span in spans:
        start = span.context_len - span.query_len
        for pos in range(start, span.context_len):
            block, offset = divmod(pos, block_size)
            slot_mapping.append(span.block_ids[block] * block_size + offset)
        (short if span.query_len <= MAX_BATCHED_QUERY_LEN else long).append(span)
    long_queries = [
        LongQuery(s.query_start, s.query_len, s.context_len,
                  _block_tensor(s.block_ids, s.context_len, block_size, device))
        for s in long
    ]
    return AttentionMetadata(
        num_tokens=len(slot_mapping),
        block_size=block_size,
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        batched=[_build_batched(g, block_size, device) for g in _group_by_context(short)],
        long_queries=long_queries,
    )


def _group_by_context(spans: list[SeqSpan]) -> list[list[SeqSpan]]:
    """Split spans, longest context first, into groups whose contexts fill most of the padding."""
    groups: list[list[SeqSpan]] = []
    for span in sorted(spans, key=lambda s: s.context_len, reverse=True):
        if groups and span.context_len >= MIN_GROUP_FILL * groups[-1][0].context_len:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _block_tensor(block_ids: Sequence[int], context_len: int, block_size: int,
                  device: torch.device) -> torch.Tensor:
    num_blocks = -(-context_len // block_size)
    return torch.tensor(list(block_ids[:num_blocks]), dtype=torch.long, device=device)


def _build_batched(spans: list[SeqSpan], block_size: int, device: torch.device) -> BatchedGroup:
    max_q = max(s.query_len for s in spans)
    max_blocks = max(-(-s.context_len // block_size) for s in spans)
    token_index: list[list[int]] = []
    valid: list[bool] = []
    block_index: list[list[int]] = []
    query_pos: list[list[int]] = []
    dest_rows: list[int] = []
    for s in spans:
        pad_q = max_q - s.query_len
        first_pos = s.context_len - s.query_len
        token_index.append(list(range(s.query_start, s.query_start + s.query_len)) + [0] * pad_q)
        valid += [True] * s.query_len + [False] * pad_q
        dest_rows += range(s.query_start, s.query_start + s.query_len)
        query_pos.append(list(range(first_pos, s.context_len)) + [0] * pad_q)
        blocks = list(s.block_ids[: -(-s.context_len // block_size)])
        block_index.append(blocks + [0] * (max_blocks - len(blocks)))
    group = BatchedGroup(
        token_index=torch.tensor(token_index, dtype=torch.long, device=device),
        valid=torch.tensor(valid, dtype=torch.bool, device=device),
        valid_index=torch.tensor([i for i, v in enumerate(valid) if v], dtype=torch.long,
                                 device=device),
        dest_rows=torch.tensor(dest_rows, dtype=torch.long, device=device),
        block_index=torch.tensor(block_index, dtype=torch.long, device=device),
        query_pos=torch.tensor(query_pos, dtype=torch.long, device=device),
        context_len=torch.tensor([s.context_len for s in spans], dtype=torch.long, device=device),
        block_size=block_size,
    )
    return group


def write_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V rows ``[T, kv_heads, head_dim]`` into their slots."""
    key_cache.index_copy_(0, slot_mapping, key)
    value_cache.index_copy_(0, slot_mapping, value)


class GatherWorkspace:
    """Reusable buffers that gathered keys and values are copied into.

    A fresh multi-megabyte tensor per layer and step comes from new pages of memory, and on CPU
    faulting those pages in costs several times the copy itself (measured: 15 ms against 2 ms
    for 60 MB). One buffer each for K and V, grown when needed and reused by every layer (a
    layer's gathered blocks are dead once its attention is computed), avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, blocks: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
        """``blocks[block_index]`` (``[..., NB]`` ids) -> ``[..., NB, block_size, Hkv, D]``."""
        shape = (*block_index.shape, *blocks.shape[1:])
        numel = block_index.numel() * blocks[0].numel()
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != blocks.dtype \
                or buffer.device != blocks.device:
            buffer = torch.empty(numel, dtype=blocks.dtype, device=blocks.device)
            self._buffers[name] = buffer
        out = buffer[:numel].view(block_index.numel(), *blocks.shape[1:])
        torch.index_select(blocks, 0, block_index.flatten(), out=out)
        return out.view(shape)


def paged_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None = None,
    workspace: GatherWorkspace | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``[T, heads, head_dim]`` against the paged cache.

    The step's own K/V must already be written. Returns ``[T, heads, head_dim]``.
    """
    out = torch.empty_like(query)
    workspace = workspace or GatherWorkspace()
    blocks_k = key_cache.view(-1, meta.block_size, *key_cache.shape[1:])
    blocks_v = value_cache.view(-1, meta.block_size, *value_cache.shape[1:])
    for group in meta.batched:
        _attend_batched(query, blocks_k, blocks_v, group, scale, window, out, workspace)
    for long in meta.long_queries:
        _attend_long(query, blocks_k, blocks_v, long, scale, window, out, workspace)
    return out


def _gather(workspace: GatherWorkspace, name: str, blocks: torch.Tensor,
            block_index: torch.Tensor) -> torch.Tensor:
    """[..., NB] block ids -> [..., kv_heads, NB * block_size, head_dim] keys or values."""
    gathered = workspace.gather(name, blocks, block_index)  # [..., NB, bs, Hkv, D]
    merged = gathered.flatten(-4, -3)  # [..., S, Hkv, D]
    return merged.transpose(-3, -2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _attend_batched(query: torch.Tensor, blocks_k: torch.Tensor, blocks_v: torch.Tensor,
                    group: BatchedGroup, scale: float, window: int | None,
                    out: torch.Tensor, workspace: GatherWorkspace) -> None:
    q = query[group.token_index].transpose(1, 2)  # [B, H, Q, D]
    k = _gather(workspace, "k", blocks_k, group.block_index)  # [B, Hkv, S, D]
    v = _gather(workspace, "v", blocks_v, group.block_index)
    attended = _sdpa(q, k, v, group.mask(window), scale)  # [B, H, Q, D]
    rows = attended.transpose(1, 2).flatten(0, 1)  # [B * Q, H, D]
    out.index_copy_(0, group.dest_rows, rows.index_select(0, group.valid_index))


def _attend_long(query: torch.Tensor, blocks_k: torch.Tensor, blocks_v: torch.Tensor,
                 long: LongQuery, scale: float, window: int | None, out: torch.Tensor,
                 workspace: GatherWorkspace) -> None:
    rows = slice(long.query_start, long.query_start + long.query_len)
    q = query[rows].transpose(0, 1)  # [H, L, D]
    k = _gather(workspace, "k", blocks_k, long.block_index)  # [Hkv, S, D]
    v = _gather(workspace, "v", blocks_v, long.block_index)
    first_pos = long.context_len - long.query_len
    query_pos = torch.arange(first_pos, long.context_len, device=q.device)[:, None]
    key_pos = torch.arange(k.shape[-2], device=q.device)
    mask = (key_pos <= query_pos) & (key_pos < long.context_len)
    if window is not None:
        mask &= query_pos - key_pos < window
    out[rows] = _sdpa(q, k, v, mask, scale).transpose(0, 1)
