"""Incremental detokenisation and stop-string matching for streamed output.

``IncrementalDetokenizer`` decodes a small window per token (the prefix_offset/read_offset technique
of TGI and vLLM), so each token costs O(1) however long the sequence is. Text ending in U+FFFD
(a multi-byte character cut between tokens) is held back until a later token completes it.

``StopMatcher`` holds back the tail that could still become a stop string.

``DetokenizedText`` chains the two for one sequence.

INVARIANT: the text emitted after feeding ``ids[:n]`` is a function of ``ids[:n]`` (and of the
prefix) only, never of how the ids or deltas were grouped into calls. Both classes hold back a tail
defined by the input so far, not by the calls, so a resumed request that replays its streamed ids
through fresh instances lands in the same state as the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# tokens of context decoded before the text being emitted: enough for any tokenizer's leading
# space and byte-fallback rules to see what precedes the new token
CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...,
               clean_up_tokenization_spaces: bool | None = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's output ids into text deltas.

    Concatenated, the deltas equal ``tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`` for byte-level BPE (GPT-2, Llama 3, Qwen) when the prefix
    ends on a character boundary (a prompt that came from text always does). More generally they
    are the output's text in context, ``decode(prefix + output)`` after ``decode(prefix)``, which
    also keeps the leading space that SentencePiece decoders strip at the start of a decode.
    Clean-up is off because it rewrites spaces around later punctuation, which a stream cannot
    take back.
    """

    def __init__(self, tokenizer: Decoder, prefix_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = [int(t) for t in prefix_ids]
        # prefix tokens whose text is still incomplete (a resumed request stopped mid-character,
        # so that text was never emitted) belong to the output: emit them once completed
        self._read = self._last_complete_boundary(len(self._ids))
        self._prefix = max(0, self._read - CONTEXT_TOKENS)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a partial character)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Release held-back text at the end of the sequence (incomplete characters as U+FFFD)."""
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special,
                                      clean_up_tokenization_spaces=False)

    def _last_complete_boundary(self, end: int) -> int:
        """The largest r <= end whose text up to r does not end in an incomplete character."""
        while end > 0:
            text = self._decode(max(0, end - 2 * CONTEXT_TOKENS), end)
            if not text.endswith(REPLACEMENT_CHAR):
                return end
            end -= 1
        return 0


class StopMatcher:
    """Cuts the stream at the first stop string; holds back what could be the start of one.

    "First" means the stop string that is complete earliest in the text (ties: the one that starts
    earliest), which is what a character-by-character stream would see first.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._held = ""  # tail of the text that is a proper prefix of some stop string
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return ``(text safe to emit, whether a stop string was reached)``."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut], True
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back tail at the end of the sequence (nothing after a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, text: str) -> int | None:
        best: tuple[int, int] | None = None  # (end, start) of the earliest-completed stop string
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class DetokenizedText:
    """One sequence's text as streamed: ``IncrementalDetokenizer`` then ``StopMatcher``.

    The scheduler's ``TextStream``: ``push`` a token, get its text delta and whether a stop
    string was reached; ``flush`` at the end releases what was held back.
    """

    def __init__(self, tokenizer: Decoder, prefix_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prefix_ids)
        self._stop = StopMatcher(stop)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._stop.feed(self._detok.push(token_id))

    def flush(self) -> str:
        text, _stopped = self._stop.feed(self._detok.flush())
        return text + self._stop.flush()
