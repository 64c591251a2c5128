"""Block allocator and block tables: unit tests plus a Hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpool.allocator import BlockAllocator, OutOfBlocksError
from kvpool.block_table import BlockTable


def test_allocate_and_free_round_trip() -> None:
    """Allocated blocks leave the free list and come back on free; integrity holds throughout."""
    alloc = BlockAllocator(8)
    ids = alloc.allocate(3)
    assert alloc.num_free == 5 and len(set(ids)) == 3
    alloc.check_integrity([ids])
    alloc.free(ids)
    assert alloc.num_free == 8
    alloc.check_integrity()


def test_ask_then_act_never_over_commits() -> None:
    """``can_allocate`` says no exactly when ``allocate`` would fail."""
    alloc = BlockAllocator(4)
    assert alloc.can_allocate(4) and not alloc.can_allocate(5)
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(5)
    assert alloc.num_free == 4


def test_double_free_is_refused() -> None:
    """Freeing a block twice raises instead of corrupting the free list."""
    alloc = BlockAllocator(2)
    ids = alloc.allocate(1)
    alloc.free(ids)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(ids)


def test_shared_block_survives_until_last_reference() -> None:
    """A block with two references stays allocated until both are dropped."""
    alloc = BlockAllocator(2)
    ids = alloc.allocate(1)
    alloc.incref(ids)
    alloc.free(ids)
    assert alloc.num_free == 1
    alloc.check_integrity([ids])
    alloc.free(ids)
    assert alloc.num_free == 2


def test_block_table_slots_and_truncate() -> None:
    """Slots follow block ids; truncating frees exactly the blocks that became empty."""
    alloc = BlockAllocator(10)
    table = BlockTable(alloc, block_size=4)
    table.append(9)  # 3 blocks
    assert len(table.block_ids) == 3
    b = table.block_ids
    assert table.slots(0, 9) == [b[i // 4] * 4 + i % 4 for i in range(9)]
    table.truncate(5)
    assert len(table.block_ids) == 2 and alloc.num_free == 8
    table.truncate(4)
    assert len(table.block_ids) == 1
    assert table.blocks_needed(1) == 1 and table.blocks_needed(0) == 0
    table.free()
    assert alloc.num_free == 10


class PoolMachine(RuleBasedStateMachine):
    """Random appends, truncations and frees over several tables never leak or double-free."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(24)
        self.tables: list[BlockTable] = []

    @rule()
    def new_table(self) -> None:
        self.tables.append(BlockTable(self.alloc, block_size=4))

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), n=st.integers(0, 20))
    def append(self, data: st.DataObject, n: int) -> None:
        table = data.draw(st.sampled_from(self.tables))
        if table.can_append(n):
            table.append(n)
        else:
            assert table.blocks_needed(n) > self.alloc.num_free

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        table.truncate(data.draw(st.integers(0, table.num_tokens)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free_table(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        table.free()
        self.tables.remove(table)

    @invariant()
    def integrity(self) -> None:
        self.alloc.check_integrity([t.block_ids for t in self.tables])
        for t in self.tables:
            assert len(t.block_ids) == -(-t.num_tokens // 4)

    def teardown(self) -> None:
        for t in self.tables:
            t.free()
        assert self.alloc.num_free == self.alloc.num_blocks


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
