"""Prompt-lookup drafting: longest suffix n-gram, most recent earlier copy, periodic repeats."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.ngram import propose_ngram


def _reference(ids: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Brute force straight from the definition: try n = max..min, scan copies newest first."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[length - n:]
        for start in range(length - n - 1, -1, -1):
            if ids[start: start + n] == suffix:
                extended = list(ids)
                for j in range(k):  # copy with period (length - start - n), reusing proposals
                    extended.append(extended[start + n + j])
                return extended[length:]
    return []


def test_continues_the_most_recent_copy_of_the_suffix() -> None:
    """The tokens after the last earlier "1 2 3" are proposed."""
    assert propose_ngram([1, 2, 3, 9, 8, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]


def test_longer_match_beats_a_more_recent_shorter_one() -> None:
    """"5 6" occurred long ago; "6" alone occurred more recently: the 2-gram's continuation wins."""
    assert propose_ngram([5, 6, 1, 4, 6, 2, 5, 6], 1) == [1]


def test_max_ngram_caps_the_match_length() -> None:
    """Beyond max_ngram tokens, a more recent copy beats a longer but older one."""
    ids = [1, 2, 3, 4, 10, 0, 2, 3, 4, 20, 1, 2, 3, 4]
    assert propose_ngram(ids, 1, max_ngram=4) == [10]
    assert propose_ngram(ids, 1, max_ngram=3) == [20]


def test_min_ngram_and_no_match_give_nothing() -> None:
    """No earlier copy of a long enough suffix -> no proposal; k <= 0 or too short -> []."""
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3, min_ngram=3) == []
    assert propose_ngram([1, 2, 3, 4], 3) == []
    assert propose_ngram([1, 2, 1], 0) == []
    assert propose_ngram([7], 3) == []


def test_repetition_continues_periodically() -> None:
    """A loop keeps being predicted past the end of the sequence: k tokens, not a truncated few."""
    assert propose_ngram([9, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert propose_ngram([4, 4, 4], 3) == [4, 4, 4]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 4), min_size=0, max_size=40), k=st.integers(0, 6),
       max_ngram=st.integers(1, 5), min_ngram=st.integers(1, 3))
def test_matches_brute_force_definition(ids: list[int], k: int, max_ngram: int,
                                        min_ngram: int) -> None:
    """On small alphabets (many matches) the result equals a brute-force scan of the definition."""
    got = propose_ngram(ids, k, max_ngram, min_ngram)
    want = _reference(ids, k, max_ngram, min_ngram) if k > 0 and max_ngram >= min_ngram else []
    assert got == want


@pytest.mark.perf
def test_fast_on_4k_tokens() -> None:
    """It runs per sequence per step: on 4,096 tokens it averages well under a millisecond, for
    random text (few matches) and for a long loop (matches everywhere)."""
    rng = random.Random(0)
    cases = [[rng.randrange(32000) for _ in range(4096)], [rng.randrange(50) for _ in range(4096)],
             [i % 7 for i in range(4096)]]
    for ids in cases:
        start = time.perf_counter()
        for _ in range(50):
            propose_ngram(ids, 4)
        assert (time.perf_counter() - start) / 50 < 1e-3
