"""A fixed pool of KV blocks: free list plus reference counts.

Blocks are identified by integer ids. A block with ref count 0 is free: on the free list, or, when
a prefix cache knows its content, evictable (kept for prefix hits until the pool needs it).
Sharing a block (a common prefix) raises its count instead of copying it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from kvpool.prefix_cache import PrefixCache


class OutOfBlocksError(RuntimeError):
    """Raised when ``allocate`` is called without a successful ``can_allocate`` first."""


class BlockAllocator:
    """Hands out block ids from a fixed pool; the ask-then-act API never over-commits."""

    def __init__(self, num_blocks: int, prefix_cache: PrefixCache | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: never-cached ones and evictable cached ones."""
        return len(self._free) + self._num_evictable

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def _num_evictable(self) -> int:
        return self.prefix_cache.num_evictable if self.prefix_cache is not None else 0

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, ref count 1: free-list blocks first, then the oldest evictable."""
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        ids = [self._take_one() for _ in range(n)]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        return ids

    def _take_one(self) -> int:
        if self._free:
            return self._free.popleft()
        assert self.prefix_cache is not None  # can_allocate counted its evictable blocks
        return self.prefix_cache.evict()

    def share(self, block_ids: Iterable[int]) -> None:
        """Take a reference to cached blocks (a prefix hit); an evictable one leaves the LRU.

        Ask first: each evictable block among them costs one of ``num_free``.
        """
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if self.prefix_cache is None or not self.prefix_cache.is_evictable(block_id):
                    raise ValueError(f"share of block {block_id}, which holds no cached content")
                self.prefix_cache.reuse(block_id)
            self._ref_counts[block_id] += 1

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
            if count > 1:
                continue
            if self.prefix_cache is not None and self.prefix_cache.is_cached(block_id):
                self.prefix_cache.release(block_id)  # keeps its KV for later hits
            else:
                self._free.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_integrity(self, tables: Iterable[Iterable[int]] = ()) -> None:
        """Assert the pool's invariants; ``tables`` are the block lists of every live sequence.

        Free and used blocks partition the pool, no block is free twice, each block's ref count
        equals the number of live tables holding it, and a free block is either on the free list
        (no cached content) or evictable in the prefix cache, never both.
        """
        free = list(self._free)
        evictable: list[int] = []
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
            evictable = self.prefix_cache.evictable_ids()
            if any(self.prefix_cache.is_cached(b) for b in free):
                raise AssertionError("a block on the free list still has a cached hash")
        free += evictable
        if len(set(free)) != len(free):
            raise AssertionError("a block is free twice")
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
