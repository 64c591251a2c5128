"""Model-free drafting by prompt lookup: continue the last n-gram where it occurred before.

Text that quotes or repeats its context (code edits, summaries, extraction, and the loops small
models fall into) is cheap to predict this way; the proposals are then verified losslessly.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(token_ids: Sequence[int], k: int, max_ngram: int = 4,
                  min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (``max_ngram`` down to ``min_ngram`` tokens) of ``token_ids``; [] when none occurred.

    A match that ends d tokens before the end predicts that the text repeats with period d, so
    once the copy reaches the end of ``token_ids`` it continues from its own proposals: a run
    "a b a b" proposes "a b a b ..." rather than stopping after two tokens.
    """
    length = len(token_ids)
    if k <= 0 or length < 2 or min_ngram < 1 or max_ngram < min_ngram:
        return []
    # reversed, the suffix n-gram is a prefix and "most recent" means "first found"
    rev = list(reversed(token_ids))
    distance = _best_match_distance(rev, max_ngram, min_ngram)
    if distance is None:
        return []
    proposal: list[int] = []
    for j in range(k):
        back = distance - 1 - j  # how far before the end the copied token sits
        proposal.append(int(rev[back]) if back >= 0 else proposal[-back - 1])
    return proposal


def _best_match_distance(rev: list[int], max_ngram: int, min_ngram: int) -> int | None:
    """Smallest j >= 1 where ``rev[j:]`` shares the longest prefix (capped at ``max_ngram``)
    with ``rev``: the most recent earlier copy of the longest suffix n-gram ends j tokens back."""
    best_len, best_j = 0, None
    last = rev[0]
    j = 0
    while True:
        try:
            j = rev.index(last, j + 1)  # C-speed scan to the next earlier copy of the last token
        except ValueError:
            break
        n = 1
        while n < max_ngram and j + n < len(rev) and rev[j + n] == rev[n]:
            n += 1
        if n > best_len:
            best_len, best_j = n, j
            if n == max_ngram:
                break  # nothing older can beat a full-length match that is more recent
    return best_j if best_len >= min_ngram else None
