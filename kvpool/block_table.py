"""The blocks that hold one sequence's KV, in order, and the slots its tokens map to."""

from __future__ import annotations

from kvpool.allocator import BlockAllocator


class BlockTable:
    """Per-sequence list of block ids covering ``num_tokens`` token slots.

    A slot is ``block_id * block_size + offset``: the row of the token in the flat KV tensors.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.block_ids: list[int] = []
        self.num_tokens = 0

    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.block_size

    def blocks_needed(self, num_new_tokens: int) -> int:
        """Blocks to allocate so that ``num_new_tokens`` more tokens fit."""
        total = self.num_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(self.block_ids))

    def can_append(self, num_new_tokens: int) -> bool:
        return self.allocator.can_allocate(self.blocks_needed(num_new_tokens))

    def share_prefix(self, block_ids: list[int]) -> None:
        """Start an empty table with cached full blocks (a prefix hit): their KV is reused."""
        if self.block_ids:
            raise ValueError("a prefix can only seed an empty block table")
        self.allocator.share(block_ids)
        self.block_ids = list(block_ids)
        self.num_tokens = len(block_ids) * self.block_size

    def append(self, num_new_tokens: int) -> None:
        """Reserve slots for ``num_new_tokens`` tokens after the current ones."""
        self.block_ids += self.allocator.allocate(self.blocks_needed(num_new_tokens))
        self.num_tokens += num_new_tokens

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` slots; blocks left empty go back to the pool.

        Speculation rolls back rejected draft tokens this way. Blocks are released last first, so
        that a prefix cache evicts a sequence's tail before the prefix others may share.
        """
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"cannot truncate {self.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        self.allocator.free(reversed(self.block_ids[keep:]))
        del self.block_ids[keep:]
        self.num_tokens = num_tokens

    def free(self) -> None:
        self.truncate(0)

    def slot(self, position: int) -> int:
        block, offset = divmod(position, self.block_size)
        return self.block_ids[block] * self.block_size + offset

    def slots(self, start: int, end: int) -> list[int]:
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"slots [{start}, {end}) outside the {self.num_tokens} reserved")
        return [self.slot(p) for p in range(start, end)]
