"""Streamed text: incremental detokenisation, stop strings, and the grouping invariant, on the
tiny byte-level tokenizer (whose multi-byte characters straddle tokens)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helix_daemon.testing.tiny_tokenizer import EOS_TOKEN, build_tokenizer, save_tokenizer
from scheduler.detokenizer import IncrementalDetokenizer, StopMatcher

VOCAB = 512
TEXTS = ["Hello there.", "We met at the café; naïve 日本語 🙂!", "x", "Привет ☔ 42"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer(VOCAB)


def _stream(tok: PreTrainedTokenizerBase, prefix: Sequence[int], ids: Sequence[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prefix)
    return [detok.push(t) for t in ids] + [detok.flush()]


# -- tiny tokenizer ---------------------------------------------------------------------------


@pytest.mark.perf
def test_tiny_tokenizer_builds_in_seconds() -> None:
    """Built offline in < 5 s: every test session builds it, several times."""
    start = time.perf_counter()
    build_tokenizer(VOCAB)
    assert time.perf_counter() - start < 5.0


def test_tiny_tokenizer_is_deterministic_and_splits_multibyte_chars(tmp_path) -> None:
    """The same vocabulary every time, eos/bos/pad = <|endoftext|> = id 0, exact round trip,
    non-ASCII characters span several tokens, and save/load works."""
    tok = build_tokenizer(VOCAB)
    assert tok.get_vocab() == build_tokenizer(VOCAB).get_vocab()
    assert len(tok) == VOCAB
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == 0
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    pieces = [tok.decode([t]) for t in tok.encode("日本語 🙂", add_special_tokens=False)]
    assert any("\ufffd" in piece for piece in pieces)
    loaded = AutoTokenizer.from_pretrained(save_tokenizer(tmp_path / "tok"))
    assert loaded.encode(TEXTS[1], add_special_tokens=False) == tok.encode(
        TEXTS[1], add_special_tokens=False)


def test_tiny_tokenizer_rejects_too_small_vocab() -> None:
    """Byte-level BPE needs all 256 bytes plus the special token."""
    with pytest.raises(ValueError):
        build_tokenizer(100)


# -- incremental detokenizer ------------------------------------------------------------------


def test_deltas_concatenate_to_decode_for_random_ids(tokenizer) -> None:
    """Random output ids (raw bytes, cut characters, the special token) after text prompts:
    the deltas joined equal decode(output ids); no delta ever ends in a partial character."""
    rng = random.Random(0)
    for _ in range(300):
        prompt = tokenizer.encode(rng.choice(TEXTS + [""]), add_special_tokens=False)
        out = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 40))]
        deltas = _stream(tokenizer, prompt, out)
        assert "".join(deltas) == tokenizer.decode(out, skip_special_tokens=True)
        assert not any(d.endswith("\ufffd") for d in deltas[:-1] if d)


def test_multibyte_text_is_held_until_complete(tokenizer) -> None:
    """Text tokenised so that characters straddle tokens streams whole characters only."""
    ids = tokenizer.encode("naïve 日本語 🙂 ok", add_special_tokens=False)
    deltas = _stream(tokenizer, [], ids)
    assert "".join(deltas) == "naïve 日本語 🙂 ok"
    assert "\ufffd" not in "".join(deltas)
    assert deltas.count("") > 0  # some tokens completed nothing on their own


def test_special_tokens_follow_skip_flag(tokenizer) -> None:
    """<|endoftext|> is dropped by default and streamed when skip_special_tokens=False."""
    ids = [*tokenizer.encode("ab", add_special_tokens=False), 0,
           *tokenizer.encode("c", add_special_tokens=False)]
    assert "".join(_stream(tokenizer, [], ids)) == "abc"
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=False) == f"ab{EOS_TOKEN}c"


def test_flush_releases_an_unfinished_character(tokenizer) -> None:
    """A stream that ends mid-character ends with U+FFFD, as decode does."""
    ids = tokenizer.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.push(t) for t in ids[:-1]) == ""
    assert detok.flush() == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_resumed_detokenizer_continues_the_same_text(tokenizer) -> None:
    """A request resumed after m streamed ids (prefix = prompt + those ids) emits, after each
    later id, exactly what the original stream emitted past its first m ids, even when the
    stream stopped mid-character (the completed character is emitted then)."""
    rng = random.Random(1)
    prompt = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    for _ in range(200):
        out = [rng.randrange(VOCAB) for _ in range(30)]
        m = rng.randint(0, 30)
        original = _stream(tokenizer, prompt, out)
        resumed = _stream(tokenizer, prompt + out[:m], out[m:])
        streamed = "".join(original[:m])
        for n in range(m, 31):
            assert "".join(original[: n + 1]) == streamed + "".join(resumed[: n + 1 - m])


class _CountingTokenizer:
    """A real tokenizer that records how many ids each decode call is given."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: bool | None) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


def test_cost_per_token_does_not_grow_with_length(tokenizer) -> None:
    """Each push decodes a window of a few tokens, not the whole sequence, over 3,000 tokens."""
    ids = tokenizer.encode("The café 日本語 sequence. " * 200, add_special_tokens=False)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, ids[:500])
    text = "".join(detok.push(t) for t in ids[500:]) + detok.flush()
    assert text == tokenizer.decode(ids[500:])
    assert len(ids) > 3000
    assert max(counting.lengths) <= 16


# -- stop strings -----------------------------------------------------------------------------


def _feed_all(stop: Sequence[str], chunks: Sequence[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stop)
    emitted, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
    emitted.append(matcher.flush())
    return emitted, stopped


def test_stop_string_split_across_deltas() -> None:
    """A stop string arriving in pieces is cut out, the text before it is kept, nothing after."""
    emitted, stopped = _feed_all(["o w"], ["hel", "lo", " wor", "ld"])
    assert stopped
    assert "".join(emitted) == "hell"
    assert emitted[1] == "l"  # "o" is held back: it could start "o w"


def test_held_back_text_is_released_at_the_end() -> None:
    """Text that only looked like the start of a stop string comes out on flush."""
    emitted, stopped = _feed_all(["STOP"], ["abc ST", "O"])
    assert not stopped
    assert emitted == ["abc ", "", "STO"]


def test_earliest_completed_stop_wins() -> None:
    """With stops "b" and "abc", text "abc" stops at "b" (complete first), keeping "a"."""
    assert _feed_all(["abc", "b"], ["abc"]) == (["a", ""], True)
    assert _feed_all(["abc", "b"], ["a", "b", "c"]) == (["", "a", "", ""], True)


def test_no_stop_strings_passes_text_through() -> None:
    """Without stop strings every delta is emitted at once."""
    assert _feed_all([], ["ab", "c"]) == (["ab", "c", ""], False)


def _expected_emitted(text: str, stops: Sequence[str]) -> str:
    """The specification: cut before the stop string that completes first; otherwise hold back
    the longest tail that is a proper prefix of a stop string."""
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if ends:
        return text[: min(ends)[1]]
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abé日 ", max_size=30),
       stops=st.lists(st.text(alphabet="abé日 ", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_grouping_invariant(text: str, stops: list[str], cuts: list[int]) -> None:
    """INVARIANT: after any chunking of the same text, what has been emitted after each chunk is
    the same function of the text so far (cut at the first stop, or minus the held-back tail)."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {len(text)})
    matcher = StopMatcher(stops)
    emitted, start = "", 0
    for end in bounds:
        out, _stopped = matcher.feed(text[start:end])
        emitted += out
        start = end
        assert emitted == _expected_emitted(text[:end], stops)


STOPS = ["é ", "the", "\ufffd!"]


def _emitted_by_boundary(tok: PreTrainedTokenizerBase, prompt: list[int], ids: list[int],
                         groups: list[int]) -> dict[int, str]:
    """Cumulative text out of detokenizer + stop matcher after each step, keyed by how many ids
    had been pushed; step i pushes ``groups[i]`` ids (cycling), as speculative steps emit 1..K+1."""
    detok, matcher = IncrementalDetokenizer(tok, prompt), StopMatcher(STOPS)
    emitted, pushed, out = "", 0, {0: ""}
    for size in _cycle(groups, len(ids)):
        step = "".join(detok.push(t) for t in ids[pushed: pushed + size])
        pushed += size
        emitted += matcher.feed(step)[0]
        out[pushed] = emitted
    return out


def _cycle(groups: list[int], total: int):
    done, i = 0, 0
    while done < total:
        size = min(groups[i % len(groups)], total - done)
        yield size
        done += size
        i += 1


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=30),
       groups=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_emitted_text_does_not_depend_on_grouping(tokenizer, ids: list[int],
                                                  groups: list[int]) -> None:
    """INVARIANT end to end: the text emitted after ids[:n] is the same whether the ids arrive one
    per step or in groups of any sizes (pushes, then one stop-matcher feed per step)."""
    prompt = tokenizer.encode("café the", add_special_tokens=False)
    one_by_one = _emitted_by_boundary(tokenizer, prompt, ids, [1])
    for n, text in _emitted_by_boundary(tokenizer, prompt, ids, groups).items():
        assert text == one_by_one[n]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30), data=st.data())
def test_replayed_stream_lands_in_the_same_state(tokenizer, ids: list[int], data) -> None:
    """A resumed request that replays its streamed ids through fresh objects (in any grouping)
    emits exactly the streamed text during the replay, then the same deltas as the original."""
    m = data.draw(st.integers(0, len(ids)))
    groups = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    prompt = tokenizer.encode("naïve", add_special_tokens=False)
    original = _emitted_by_boundary(tokenizer, prompt, ids, [1])
    replayed = _emitted_by_boundary(tokenizer, prompt, ids[:m], groups)
    assert replayed[m] == original[m]
    detok, matcher = IncrementalDetokenizer(tokenizer, prompt), StopMatcher(STOPS)
    pushed = 0
    for size in _cycle(groups, m):
        matcher.feed("".join(detok.push(t) for t in ids[pushed: pushed + size]))
        pushed += size
    emitted = original[m]
    for n in range(m, len(ids)):
        emitted += matcher.feed(detok.push(ids[n]))[0]
        assert emitted == original[n + 1]
