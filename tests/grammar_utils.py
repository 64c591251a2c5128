"""The reference for constrained decoding: Hugging Face ``generate`` with a logits processor on
llguidance's own matcher (one sequence, no batching, no speculation), and schemas to test with."""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from helix_daemon.engine.grammar import grammar_text
from scheduler.params import OutputConstraint

# every string, array and number bounded, no extra properties: a random tiny model ends them too
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "additionalProperties": False, "required": ["id", "ok"],
     "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "ok": {"type": "boolean"}}},
    {"type": "object", "additionalProperties": False, "required": ["user", "tags", "role"],
     "properties": {
         "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                  "properties": {"name": {"type": "string", "maxLength": 6},
                                 "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
         "tags": {"type": "array", "maxItems": 3,
                  "items": {"enum": ["red", "green", "blue"]}},
         "role": {"enum": ["admin", "guest", 7, None]}}},
    {"type": "array", "minItems": 1, "maxItems": 4,
     "items": {"type": "object", "additionalProperties": False, "required": ["x"],
               "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                              "label": {"type": "string", "pattern": "^[a-c]{1,3}$"}}}},
]


def schema_constraint(schema: dict[str, Any]) -> OutputConstraint:
    import json

    return OutputConstraint("json_schema", json.dumps(schema))


class GrammarProcessor(LogitsProcessor):
    """llguidance's mask on HF's logits, unpacked with numpy (independently of Helix's code)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab: int, eos: list[int],
                 constraint: OutputConstraint) -> None:
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
        self.matcher = llguidance.LLMatcher(self.lltok, grammar_text(constraint))
        self.vocab = vocab
        self.num_seen: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.num_seen is not None:
            assert self.matcher.consume_token(int(input_ids[0, -1])), self.matcher.get_error()
        self.num_seen = input_ids.shape[1]
        bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab)
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, 0)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
        allowed = torch.from_numpy(bits[: scores.shape[-1]].astype(bool))
        return scores.masked_fill(~allowed, float("-inf"))


def hf_constrained_greedy(model: Any, tokenizer: PreTrainedTokenizerBase, eos: list[int],
                          prompt_ids: list[int], constraint: OutputConstraint,
                          max_tokens: int) -> list[int]:
    """HF ``generate`` under the grammar, greedy, cut where Helix stops: the grammar's end (no
    token but EOS may follow) or an EOS."""
    vocab = model.get_output_embeddings().out_features
    processor = GrammarProcessor(tokenizer, vocab, eos, constraint)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=model.device),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos[0],
                             logits_processor=LogitsProcessorList([processor]))
    tokens = out[0, len(prompt_ids):].tolist()
    check = llguidance.LLMatcher(processor.lltok, grammar_text(constraint))
    for i, token in enumerate(tokens):
        assert check.consume_token(token), check.get_error()
        if check.is_stopped() or token in eos:
            return tokens[: i + 1]
    return tokens
