"""Prefix caching policy: which cached blocks a sequence may reuse, and which of its blocks
become reusable by others.

Only full blocks whose KV the target has computed (verified tokens, never unchecked drafts) are
registered. A hit is capped so that at least the sequence's last token is computed again: its
logits give the next token. Draft-model KV is tracked per block (``mark_draft_valid``) so a hit
never lets a draft model attend to draft slots nobody wrote; it prefills what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.prefix_cache import ROOT_HASH, BlockHash, PrefixCache, hash_block
from scheduler.sequence import Sequence


@dataclass(slots=True)
class PrefixHit:
    """The cached blocks a sequence can start from, and how much of them has draft KV."""

    block_ids: list[int]
    num_tokens: int
    num_draft_tokens: int  # leading tokens whose draft-model KV is in the hit blocks too
    num_evictable: int  # hit blocks nobody holds: taking them costs free blocks


NO_HIT = PrefixHit([], 0, 0, 0)


class PrefixMatcher:
    """Looks sequences up in a ``PrefixCache`` and registers their computed blocks in it."""

    def __init__(self, cache: PrefixCache, block_size: int) -> None:
        self.cache = cache
        self.block_size = block_size
        self.num_queried_tokens = 0  # tokens looked up at admissions (vLLM's "queries")
        self.num_hit_tokens = 0  # of those, tokens served from the cache

    def find(self, seq: Sequence) -> PrefixHit:
        """The longest run of cached leading blocks, leaving the last token to compute."""
        if seq.cache_key is None:
            return NO_HIT
        max_blocks = (seq.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in self._hashes(seq, max_blocks)[:max_blocks]:
            block_id = self.cache.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        num_draft = next((i for i, b in enumerate(block_ids)
                          if not self.cache.is_draft_valid(b)), len(block_ids))
        num_evictable = sum(self.cache.is_evictable(b) for b in block_ids)
        return PrefixHit(block_ids, len(block_ids) * self.block_size,
                         num_draft * self.block_size, num_evictable)

    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """``seq`` starts from ``hit``: count it (its first admission is what it reports)."""
        seq.num_registered_blocks = len(hit.block_ids)
        seq.num_draft_marked_blocks = hit.num_draft_tokens // self.block_size
        if seq.cache_key is None:
            return
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += hit.num_tokens
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(hit.num_tokens, seq.num_prompt_tokens)

    def register(self, seq: Sequence) -> None:
        """Index every full block of ``seq`` whose KV is now computed (after a step)."""
        table = seq.block_table
        if seq.cache_key is None or table is None:
            return
        num_full = seq.num_computed // self.block_size
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            # False when another sequence registered the same content first: ours stays private
            self.cache.register(table.block_ids[i], hashes[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)
        num_draft_full = min(seq.num_draft_computed, seq.num_computed) // self.block_size
        for i in range(seq.num_draft_marked_blocks, num_draft_full):
            self.cache.mark_draft_valid(table.block_ids[i])
        seq.num_draft_marked_blocks = max(seq.num_draft_marked_blocks, num_draft_full)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """``seq``'s chained block hashes, extended lazily to at least ``num_blocks``."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else ROOT_HASH
            assert seq.cache_key is not None
            hashes.append(hash_block(parent, seq.token_ids[start: start + size], seq.cache_key))
        return hashes
