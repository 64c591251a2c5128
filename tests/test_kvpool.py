"""Block allocator and block tables: unit tests plus a Hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpool.allocator import BlockAllocator, OutOfBlocksError
from kvpool.block_table import BlockTable
from kvpool.prefix_cache import ROOT_HASH, PrefixCache, hash_block


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


def test_block_hash_chains_parent_tokens_and_salt() -> None:
    """A block's hash changes with its parent, any token and the extra key, and is stable."""
    h = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert h == hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert h != hash_block(h, [1, 2, 3, 4])
    assert h != hash_block(ROOT_HASH, [1, 2, 3, 5])
    assert h != hash_block(ROOT_HASH, [1, 2, 3, 4], b"salt:a")
    # length-prefixed parts: moving bytes between the parts never gives the same hash
    assert hash_block(b"", [1], b"x") != hash_block(b"x", [1], b"")


def test_freed_cached_blocks_stay_hittable_and_tails_are_evicted_first() -> None:
    """A finished sequence's cached blocks stay out of the free list until the pool needs them;
    then the least recently released go first, and a sequence's tail before its head."""
    cache = PrefixCache()
    alloc = BlockAllocator(4, cache)
    table = BlockTable(alloc, block_size=2)
    table.append(6)  # blocks a, b, c: all full
    a, b, c = table.block_ids
    for block_id, name in zip(table.block_ids, (b"a", b"b", b"c")):
        assert cache.register(block_id, name)
    table.free()
    assert alloc.num_free == 4 and alloc.num_used == 0
    assert cache.evictable_ids() == [c, b, a]  # released in reverse order
    hit = BlockTable(alloc, block_size=2)
    hit.share_prefix([a])  # a leaves the evictable set
    alloc.check_integrity([hit.block_ids])
    fresh = alloc.allocate(2)  # the never-cached block first, then the oldest evictable: c
    assert c in fresh and cache.lookup(b"c") is None and cache.lookup(b"b") == b
    alloc.check_integrity([hit.block_ids, fresh])
    alloc.free(fresh)
    hit.free()
    alloc.check_integrity()


def test_sharing_counts_references_and_refuses_uncached_blocks() -> None:
    """A shared block is freed (made evictable) only when its last holder lets go; sharing a
    block nobody cached is refused."""
    cache = PrefixCache()
    alloc = BlockAllocator(3, cache)
    [block] = alloc.allocate(1)
    cache.register(block, b"h")
    alloc.share([block])
    assert alloc.ref_count(block) == 2
    alloc.free([block])
    assert not cache.is_evictable(block)
    alloc.free([block])
    assert cache.is_evictable(block)
    [other] = alloc.allocate(1)
    alloc.free([other])
    with pytest.raises(ValueError, match="no cached content"):
        alloc.share([other])
    assert cache.register(block, b"h2") is False  # one hash per block
    alloc.check_integrity()


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


class PrefixPoolMachine(RuleBasedStateMachine):
    """Tables that register their full blocks and start from others' cached blocks, appends,
    truncations and frees over a small pool: no leak, no double free, a cached block is never
    handed out while held, hits always find the content they were registered with, and at the
    end every block is free or cached-and-free."""

    SIZE = 2

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache()
        self.alloc = BlockAllocator(10, self.cache)
        self.tables: list[BlockTable] = []
        self.content: dict[int, bytes] = {}  # block id -> hash of what was written into it

    @rule(data=st.data())
    def new_table(self, data: st.DataObject) -> None:
        """A new table, seeded with some cached blocks when that fits (a prefix hit)."""
        table = BlockTable(self.alloc, block_size=self.SIZE)
        cached = [b for b in range(self.alloc.num_blocks) if self.cache.is_cached(b)]
        hit = data.draw(st.lists(st.sampled_from(cached), unique=True, max_size=3)) \
            if cached else []
        if sum(self.cache.is_evictable(b) for b in hit) <= self.alloc.num_free:
            table.share_prefix(hit)
            for block_id in hit:  # the hit serves what was registered
                assert self.cache.lookup(self.content[block_id]) == block_id
        self.tables.append(table)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), n=st.integers(0, 6))
    def append(self, data: st.DataObject, n: int) -> None:
        table = data.draw(st.sampled_from(self.tables))
        if table.can_append(n):
            before = len(table.block_ids)
            table.append(n)
            for block_id in table.block_ids[before:]:  # fresh blocks: nobody else holds them
                assert self.alloc.ref_count(block_id) == 1 and not self.cache.is_cached(block_id)
                self.content[block_id] = data.draw(st.binary(min_size=4, max_size=4))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def register_full_blocks(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        for block_id in table.block_ids[: table.num_tokens // self.SIZE]:
            self.cache.register(block_id, self.content[block_id])

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        # a shared (cached) prefix is never cut into: sequences only roll back their own tail
        shared = sum(self.cache.is_cached(b) for b in table.block_ids) * self.SIZE
        table.truncate(data.draw(st.integers(min(shared, table.num_tokens), table.num_tokens)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free_table(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        table.free()
        self.tables.remove(table)

    @invariant()
    def integrity(self) -> None:
        self.alloc.check_integrity([t.block_ids for t in self.tables])

    def teardown(self) -> None:
        for t in self.tables:
            t.free()
        assert self.alloc.num_free == self.alloc.num_blocks and self.alloc.num_used == 0
        self.alloc.check_integrity()


TestPrefixPoolMachine = PrefixPoolMachine.TestCase
TestPrefixPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
