"""Structured output on the real SmolLM2-135M-Instruct: chat requests constrained by JSON schemas
and by ``json_object`` parse and validate, and the greedy ones equal HF ``generate`` with
llguidance's mask on the same ids (float32)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from helix_daemon.engine.chat import ChatPrompt, render_chat
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import ResolvedModel
from scheduler.params import OutputConstraint, RequestParams, SamplingParams
from tests.daemon_harness import one_torch_thread
from tests.grammar_utils import hf_constrained_greedy, schema_constraint

MAX_TOKENS = 48
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "city": {"type": "string"}}}
COLOURS = {"type": "object", "required": ["colours"],
           "properties": {"colours": {"type": "array", "minItems": 2, "maxItems": 4,
                                      "items": {"enum": ["red", "green", "blue", "yellow"]}}}}
ASK_PERSON = [{"role": "user", "content": "Describe Ana, 30, from Lisbon, as JSON."}]
ASK_COLOURS = [{"role": "user", "content": "List two colours of the sky as JSON."}]
ASK_SUM = [{"role": "user", "content": 'What is 2+2? Answer as JSON with the key "answer".'}]
# (messages, constraint, schema to validate with, temperature)
REQUESTS: dict[str, tuple[list[dict[str, str]], OutputConstraint, dict[str, Any], float]] = {
    "person-greedy": (ASK_PERSON, schema_constraint(PERSON), PERSON, 0.0),
    "person-sampled": (ASK_PERSON, schema_constraint(PERSON), PERSON, 1.0),
    "colours-greedy": (ASK_COLOURS, schema_constraint(COLOURS), COLOURS, 0.0),
    "object-greedy": (ASK_SUM, OutputConstraint("json_object"), {"type": "object"}, 0.0),
}


@pytest.fixture(scope="module")
def engine(first_resolve: ResolvedModel) -> Engine:
    """Helix's engine on the converted SmolLM2 folder, float32 on CPU."""
    return Engine.from_config(EngineConfig(model=first_resolve.path, device="cpu",
                                           dtype="float32", num_kv_blocks=128))


def test_chat_json_validates_and_greedy_equals_hf(engine: Engine,
                                                  hf_from_gguf: tuple[Any, Any]) -> None:
    """Four chat requests in one batch (two schemas, greedy and sampled, and any JSON object):
    every output parses, validates and ends with ``stop``; each greedy one is token-identical to
    HF generate with llguidance's mask."""
    model, tokenizer = hf_from_gguf
    eos = sorted(engine.scheduler.eos_token_ids)
    got: dict[str, list[int]] = {r: [] for r in REQUESTS}
    reasons: dict[str, str | None] = {}
    with one_torch_thread():
        for request_id, (messages, constraint, _, temperature) in REQUESTS.items():
            engine.add_request(request_id, ChatPrompt(messages), RequestParams(
                max_tokens=MAX_TOKENS, constraint=constraint,
                sampling=SamplingParams(temperature=temperature, seed=7)))
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        expected = {r: hf_constrained_greedy(model, tokenizer, eos,
                                             render_chat(engine.tokenizer, ChatPrompt(m)), c,
                                             MAX_TOKENS)
                    for r, (m, c, _, t) in REQUESTS.items() if t == 0.0}
    for request_id, (_, _, schema, _) in REQUESTS.items():
        text = engine.tokenizer.decode(got[request_id])
        assert reasons[request_id] == "stop", (request_id, text)
        jsonschema.validate(json.loads(text), schema)
    assert {r: got[r] for r in expected} == expected
