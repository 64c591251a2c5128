"""Structured output on the engine's side, with llguidance: compile each request's constraint off
the step loop, and give each request its own matcher.

Compilation (building the tokenizer's token trie once, then each grammar's parser) runs on one
worker thread, so a step never waits for it; results are cached by ``OutputConstraint.key``, and
each request gets a copy of the compiled matcher. The masks cover the model's logits width (its
head may be wider than the tokenizer: the extra ids are never allowed). The grammar ends at the
model's EOS ids: once nothing but EOS may follow, the matcher is terminated.

Why llguidance rather than xgrammar (``bench/grammar_libs.py`` on this 2-core host, 2026-12-08,
load average 1.5): per token of a JSON document, mask fill + accept cost xgrammar 3.1 us and
llguidance 51 us with SmolLM2's 49,152 ids (1.6 and 9.0 us with the tiny tokenizer's 512), so at 64
constrained rows llguidance adds ~3 ms to a ~210 ms SmolLM2 step and xgrammar ~0.2 ms: both far
inside the 10 % budget (``bench/structured_output.py`` measured no step overhead beyond the
noise). xgrammar is faster per mask, but on Linux x86-64 it requires triton (a GPU compiler of
several hundred MB a CPU daemon never runs) and apache-tvm-ffi; llguidance is one 3 MB wheel with
no dependencies, takes fast Hugging Face tokenizers directly, and can count the drafts a grammar
accepts without changing its state (``validate_tokens``). Swapping the library touches only
this module (the scheduler sees the ``TokenConstraint`` protocol).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from scheduler.errors import InvalidRequestError
from scheduler.params import OutputConstraint

if TYPE_CHECKING:  # a TypedDict of the stubs only
    from llguidance._lib import JsonCompileOptions

CACHE_SIZE = 256  # compiled grammars kept (least recently asked for dropped first)


class Matcher:
    """One request's grammar state over llguidance's ``LLMatcher`` (a ``TokenConstraint``)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self._num_words = (vocab_size + 31) // 32  # of llguidance's masks

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._m.is_stopped():
            # only rows after the grammar's end (a draft past it): their tokens are dropped, but
            # a row must allow something so its distribution stays defined
            bitmask[row] = -1
            return
        if bitmask.shape[1] == self._num_words:
            llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)
            return
        # a model head narrower than the tokenizer: the ids past it can never be sampled
        full = llguidance.torch.allocate_token_bitmask(1, self._num_words * 32)
        llguidance.torch.fill_next_token_bitmask(self._m, full, 0)
        bitmask[row] = full[0, : bitmask.shape[1]]

    def accept(self, token: int) -> bool:
        # a refused token leaves an LLMatcher in an error state for good: callers only pass
        # tokens the mask allowed, or checked ones (num_valid)
        return bool(self._m.consume_token(token))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._m.get_error()}")

    def num_valid(self, tokens: Sequence[int]) -> int:
        """Leading tokens the grammar accepts, up to and including the one that ends it."""
        valid = self._m.validate_tokens(list(tokens))
        taken = 0
        while taken < valid and not self._m.is_stopped():
            self._m.consume_token(tokens[taken])
            taken += 1
        self.rollback(taken)
        return taken

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())


class GrammarCompiler:
    """Compiles constraints on one worker thread; ``compile`` returns at once with a future."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                 eos_token_ids: Iterable[int]) -> None:
        self._hf_tokenizer = tokenizer
        # masks cover the model's logits width (a padded head's extra ids are never allowed),
        # or the tokenizer's where that is wider (llguidance needs every token id)
        self._vocab_size = max(vocab_size, len(tokenizer))
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s)
        self._executor: ThreadPoolExecutor | None = None
        # touched by the engine's thread only (the worker only runs _compile)
        self._cache: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()

    def compile(self, constraint: OutputConstraint) -> Future[llguidance.LLMatcher]:
        """The compiled grammar of ``constraint``, from the cache or queued for the worker."""
        future = self._cache.get(constraint.key)
        if future is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="helix-grammar")
            future = self._executor.submit(self._compile, constraint)
            self._cache[constraint.key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(constraint.key)
        return future

    def matcher(self, compiled: llguidance.LLMatcher, forced: Sequence[int]) -> Matcher:
        """A request's own matcher, already past ``forced`` (output an earlier attempt streamed,
        resumed on takeover); raise InvalidRequestError when the grammar refuses it."""
        matcher = Matcher(compiled.deep_copy(), self._vocab_size)
        if matcher.num_valid(forced) < len(forced) or not all(map(matcher.accept, forced)):
            raise InvalidRequestError("the output so far does not match the request's grammar")
        return matcher

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        try:
            if self._tokenizer is None:
                if not isinstance(self._hf_tokenizer, PreTrainedTokenizerFast):
                    raise InvalidRequestError("structured output needs a fast (Rust) tokenizer")
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos)
            grammar = grammar_text(constraint)
            matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        except InvalidRequestError:
            raise
        except Exception as e:  # whatever the library refuses is this request's problem only
            raise InvalidRequestError(f"the {constraint.kind} cannot be used: "
                                      f"{type(e).__name__}: {e}"[:1000]) from e
        if matcher.is_error():
            raise InvalidRequestError(
                f"the {constraint.kind} does not compile: {matcher.get_error()}"[:1000])
        return matcher


# JSON is laid out as Python's json.dumps does by default (", " and ": ", no other whitespace):
# free whitespace lets a model pad forever (vLLM met it with xgrammar's any_whitespace). A schema
# may choose otherwise in its "x-guidance" object (llguidance's JSON options).
JSON_LAYOUT: JsonCompileOptions = {
    "item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def grammar_text(constraint: OutputConstraint) -> str:
    """llguidance's grammar for a constraint (validated when a matcher is built from it)."""
    try:
        if constraint.kind in ("json_object", "json_schema"):
            schema = constraint.source if constraint.kind == "json_schema" else '{"type":"object"}'
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_LAYOUT))
        if constraint.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(constraint.source))
        return str(llguidance.LLMatcher.grammar_from_lark(constraint.source))
    except ValueError as e:
        raise InvalidRequestError(f"the {constraint.kind} is not valid: {e}") from e
