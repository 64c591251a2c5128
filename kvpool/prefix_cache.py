"""Which full blocks hold known content: chained block hashes, and the evictable LRU of blocks
that no sequence holds any more but that keep their KV until the pool needs them.

A block's hash covers its own token ids, its parent block's hash (so equal hashes mean equal
whole prefixes) and extra keys (a tenant's ``cache_salt``). It is a cryptographic hash, so a
collision, which would serve another prefix's KV, does not happen in practice.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes
# the hash a sequence's first block chains from
ROOT_HASH: BlockHash = b""


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """The chained hash of one full block: ``blake2b(parent, extra, token ids)``.

    Each part is length-prefixed, so no two different inputs encode to the same bytes.
    """
    digest = hashlib.blake2b(digest_size=32)
    for part in (parent, extra, array("q", token_ids).tobytes()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


class PrefixCache:
    """hash -> block id for blocks whose KV is complete, plus the LRU of those held by no one.

    The allocator owns reference counts; this index only learns when a cached block's count
    reaches zero (``release``: it becomes evictable) or leaves zero again (``reuse``).
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._draft_valid: set[int] = set()  # cached blocks whose draft-model KV is written too

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def is_draft_valid(self, block_id: int) -> bool:
        return block_id in self._draft_valid

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Index a held block under its hash; False (nothing changes) when the hash already
        names another block, or this block already has a hash."""
        if block_hash in self._block_of or block_id in self._hash_of:
            return False
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def mark_draft_valid(self, block_id: int) -> None:
        if block_id in self._hash_of:
            self._draft_valid.add(block_id)

    def release(self, block_id: int) -> None:
        """Nobody holds the cached ``block_id`` any more: it is the newest eviction candidate."""
        self._evictable[block_id] = None

    def reuse(self, block_id: int) -> None:
        """A sequence takes the evictable ``block_id`` back (a prefix hit)."""
        del self._evictable[block_id]

    def evict(self) -> int:
        """Forget the least recently released block and hand its id over for new content."""
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block_id)]
        self._draft_valid.discard(block_id)
        return block_id

    def evictable_ids(self) -> list[int]:
        return list(self._evictable)

    def check_integrity(self) -> None:
        """The two maps are inverse, and every evictable or draft-valid block is cached."""
        if any(self._block_of.get(h) != b for b, h in self._hash_of.items()) or \
                len(self._block_of) != len(self._hash_of):
            raise AssertionError("prefix cache: hash and block maps disagree")
        if not set(self._evictable) <= set(self._hash_of) or \
                not self._draft_valid <= set(self._hash_of):
            raise AssertionError("prefix cache: an evictable or draft-valid block has no hash")
