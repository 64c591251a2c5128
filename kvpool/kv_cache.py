"""Paged KV tensors for one model: per layer, K and V rows addressed by slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpool.attention import GatherWorkspace


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The shape of one model's KV cache; works for MHA, GQA and MQA alike."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size


def num_blocks_for_budget(specs: list[KVCacheSpec], budget_bytes: int, block_size: int) -> int:
    """How many blocks fit in ``budget_bytes`` when each block holds every model's KV.

    With speculation the target and the draft model share block tables, so one block id stores
    both models' KV for its 16 positions.
    """
    per_block = sum(spec.bytes_per_block(block_size) for spec in specs)
    return budget_bytes // per_block


class PagedKVCache:
    """K and V tensors of shape ``[num_blocks * block_size, num_kv_heads, head_dim]`` per layer."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=spec.device)
                     for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=spec.device)
                       for _ in range(spec.num_layers)]
        self.workspace = GatherWorkspace()  # shared by the layers: one runs at a time

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block(self.block_size)
