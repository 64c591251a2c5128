"""A fixed pool of KV blocks: free list plus reference counts.

Blocks are identified by integer ids. A block with ref count 0 is on the free list; sharing a block
(a common prefix, later) raises its count instead of copying it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised when ``allocate`` is called without a successful ``can_allocate`` first."""


class BlockAllocator:
    """Hands out block ids from a fixed pool; the ask-then-act API never over-commits."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        return ids

    def incref(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"incref of free block {block_id}")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero go back to the free list."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_integrity(self, tables: Iterable[Iterable[int]] = ()) -> None:
        """Assert the pool's invariants; ``tables`` are the block lists of every live sequence.

        Free and used blocks partition the pool, no block is free twice, and each block's ref count
        equals the number of live tables holding it.
        """
        free = list(self._free)
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        holders = [0] * self.num_blocks
        for table in tables:
            for block_id in table:
                holders[block_id] += 1
        for block_id, count in enumerate(self._ref_counts):
            if count != holders[block_id]:
                raise AssertionError(
                    f"block {block_id}: ref count {count} but held by {holders[block_id]} tables"
                )
        if {b for b, c in enumerate(self._ref_counts) if c == 0} != set(free):
            raise AssertionError("free list does not match the blocks with ref count 0")
