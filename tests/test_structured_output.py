"""Structured output on tiny models: JSON schemas, regexes and Lark grammars constrain sampled and
greedy decoding, exactly as HF ``generate`` with llguidance's mask does, with or without
speculation; a grammar that does not compile answers ``invalid_request`` through Redis."""

from __future__ import annotations

import collections
import functools
import json
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from transformers import AutoTokenizer

from helix_daemon.engine.engine import Engine
from helix_daemon.testing.tiny_models import build_draft_target_pair
from helix_daemon.wire import protocol as p
from scheduler.errors import InvalidRequestError
from scheduler.params import OutputConstraint, RequestParams, SamplingParams
from tests.daemon_harness import (
    ThreadDaemon,
    enqueue,
    is_finished,
    read_result,
    serving_thread_daemon,
    wait_until,
)
from tests.engine_utils import _dense, greedy, hf_greedy, make_engine
from tests.grammar_utils import SCHEMAS, hf_constrained_greedy, schema_constraint

REGEX = r"[a-d]{2,4}-[0-9]{3}"
LARK = 'start: "answer: " ANSWER\nANSWER: "yes" | "no" | "maybe"'


@pytest.mark.parametrize("fields,expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, OutputConstraint("json_object")),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"b": {}, "a": {}}}}}},
     OutputConstraint("json_schema", '{"type":"object","properties":{"b":{},"a":{}}}')),
    ({"regex": "[0-9]+"}, OutputConstraint("regex", "[0-9]+")),
    ({"grammar": LARK}, OutputConstraint("grammar", LARK)),
])
def test_protocol_maps_structured_output_fields(fields: dict[str, Any],
                                                expected: OutputConstraint | None) -> None:
    """response_format (OpenAI's shapes), regex and grammar become the request's constraint; a
    schema keeps its key order (the order properties are generated in)."""
    body = p.RequestBody(prompt="x", **fields)
    assert p.to_request_params(body).constraint == expected


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "xml"}},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
    {"regex": ""},
    {"regex": "a", "grammar": LARK},
    {"response_format": {"type": "json_object"}, "regex": "a"},
])
def test_malformed_structured_output_fields_are_invalid(fields: dict[str, Any]) -> None:
    """Unknown response_format types, a missing schema, an empty regex or two constraints at once
    are refused before the engine sees them."""
    with pytest.raises(InvalidRequestError):
        p.to_request_params(p.RequestBody(prompt="x", **fields))


def _run(engine: Engine, requests: dict[str, tuple[list[int], RequestParams]]
         ) -> dict[str, tuple[list[int], str | None]]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    out: dict[str, list[int]] = {r: [] for r in requests}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        engine.check_integrity()
    return {r: (out[r], reasons[r]) for r in requests}


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(1, 512) for _ in range(rng.randint(3, 20))]


def test_sampled_outputs_validate_and_plain_rows_stay_exact(tiny_model_path: Path) -> None:
    """Twelve sampled constrained requests (three schemas, a regex, a Lark grammar) share every
    step with two greedy plain ones: each constrained output ends with ``stop`` where its grammar
    ends and parses and validates (or matches); the plain ones equal HF generate alone."""
    path = str(tiny_model_path)
    rng = random.Random(0)
    engine = make_engine(path, num_kv_blocks=256)
    tokenizer = engine.tokenizer
    constrained = [schema_constraint(s) for s in SCHEMAS for _ in range(3)]
    constrained += [OutputConstraint("regex", REGEX)] * 2 + [OutputConstraint("grammar", LARK)]
    requests = {f"c{i}": (_prompt(rng), RequestParams(
        max_tokens=200, sampling=SamplingParams(temperature=1.0, seed=i), constraint=c))
        for i, c in enumerate(constrained)}
    plain = {f"g{i}": (_prompt(rng), greedy(24)) for i in range(2)}
    results = _run(engine, {**requests, **plain})
    for request_id, (_, params) in requests.items():
        tokens, reason = results[request_id]
        text = tokenizer.decode(tokens)
        assert reason == "stop", (request_id, text)
        assert params.constraint is not None
        if params.constraint.kind == "json_schema":
            jsonschema.validate(json.loads(text), json.loads(params.constraint.source))
        elif params.constraint.kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            assert re.fullmatch("answer: (yes|no|maybe)", text), text
    for request_id, (prompt, params) in plain.items():
        assert results[request_id][0] == hf_greedy(path, prompt, params.max_tokens)


@functools.cache
def _pair() -> tuple[str, str]:
    draft, target = build_draft_target_pair(tempfile.mkdtemp(), tempfile.mkdtemp(),
                                            residual_scale=0.1)
    return str(draft), str(target)


def _greedy_jobs() -> list[tuple[str, list[int], OutputConstraint]]:
    rng = random.Random(3)
    constraints = [schema_constraint(SCHEMAS[1]), schema_constraint(SCHEMAS[2]),
                   OutputConstraint("regex", REGEX), OutputConstraint("json_object")]
    return [(f"j{i}", _prompt(rng), c) for i, c in enumerate(constraints)]


@functools.cache
def _hf_reference() -> dict[str, list[int]]:
    _, target = _pair()
    tokenizer = AutoTokenizer.from_pretrained(target)
    return {rid: hf_constrained_greedy(_dense(target), tokenizer, [0], prompt, c, 60)
            for rid, prompt, c in _greedy_jobs()}


@pytest.mark.parametrize("drafter,overrides", [
    ("none", {"num_kv_blocks": 256}),
    ("ngram", {"num_kv_blocks": 256}),
    ("model", {"num_kv_blocks": 256}),
    ("model", {"num_kv_blocks": 8, "max_num_batched_tokens": 32}),  # preemption
])
def test_greedy_constrained_equals_hf_generate(drafter: str, overrides: dict[str, int]) -> None:
    """Greedy constrained requests batched together (two schemas, a regex, any JSON object) are
    token-identical to HF generate with llguidance's mask, without speculation, with n-gram
    drafts (cut where the grammar refuses them) and with a draft model (masked too), also when
    preemption recomputes sequences mid-way (the matcher keeps their tokens)."""
    draft, target = _pair()
    engine = make_engine(target, draft={"none": "none", "ngram": "ngram", "model": draft}[drafter],
                         num_speculative_tokens=3, adaptive_speculation=False, **overrides)
    results = _run(engine, {rid: (prompt, RequestParams(
        max_tokens=60, sampling=SamplingParams(temperature=0.0), constraint=c))
        for rid, prompt, c in _greedy_jobs()})
    assert {rid: tokens for rid, (tokens, _) in results.items()} == _hf_reference()
    stats = engine.stats()
    if drafter != "none":
        assert stats.num_draft_proposed > 0 and stats.num_draft_accepted > 0
    if overrides["num_kv_blocks"] == 8:
        assert stats.num_preemptions > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_resumed_output_rebuilds_the_matcher() -> None:
    """A takeover resumes with the tokens already streamed as forced output: the new matcher is
    moved past them and the rest equals the uninterrupted run; forced output the grammar refuses
    ends the request as invalid."""
    _, target = _pair()
    rid, prompt, constraint = _greedy_jobs()[0]
    expected = _hf_reference()[rid]
    engine = make_engine(target, num_kv_blocks=64)
    params = RequestParams(max_tokens=60, sampling=SamplingParams(temperature=0.0),
                           constraint=constraint)
    engine.add_request("resumed", prompt, params, forced_output_ids=expected[:5])
    not_json = engine.tokenizer.convert_tokens_to_ids("z")  # an object cannot start with z
    engine.add_request("refused", prompt, params, forced_output_ids=[not_json])
    got: list[int] = []
    errors: dict[str, str] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                errors[o.request_id] = o.error
            else:
                got += o.new_token_ids
    assert got == expected[5:]
    assert list(errors) == ["refused"] and "does not match" in errors["refused"]


def test_abort_while_waiting_for_the_grammar(tiny_model_path: Path) -> None:
    """A constrained request waits outside the scheduler until a step admits it with its
    grammar: its id is taken meanwhile, and an abort then ends it with ``abort`` at the next
    step, leaving the engine idle."""
    engine = make_engine(str(tiny_model_path), num_kv_blocks=32)
    params = RequestParams(max_tokens=8, sampling=SamplingParams(temperature=0.0),
                           constraint=schema_constraint(SCHEMAS[0]))
    engine.add_request("a", [5, 6, 7], params)
    with pytest.raises(InvalidRequestError, match="already in the engine"):
        engine.add_request("a", [5, 6, 7], params)
    assert engine.stats().num_waiting == 1
    assert engine.abort("a") and not engine.abort("a")
    outputs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outputs] == [("a", True, "abort")]
    assert not engine.has_unfinished()


@pytest.fixture(scope="module")
def tiny_daemon(tiny_model_path: Path, redis_url: str) -> Iterator[tuple[ThreadDaemon, str]]:
    prefix = f"helixtest-grammar-{id(tiny_model_path):x}"
    with serving_thread_daemon(str(tiny_model_path), redis_url, prefix) as daemon:
        yield daemon, prefix


def test_bad_grammars_are_invalid_requests_through_redis(
        tiny_daemon: tuple[ThreadDaemon, str], redis_url: str) -> None:
    """Through Redis, a schema, a regex and a Lark grammar that do not compile each end their
    request with an ``invalid_request`` event; the daemon goes on serving a constrained request
    (valid JSON, finish_reason stop) and a plain one."""
    _, prefix = tiny_daemon
    client = redis.Redis.from_url(redis_url)
    base = {"prompt_token_ids": [5, 6, 7], "max_tokens": 120, "temperature": 0}
    bad = {"schema": {"response_format": {"type": "json_schema", "json_schema": {
               "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/x"}},
                                         "required": ["a"]}}}},
           "regex": {"regex": "([a-z]"},
           "lark": {"grammar": "start: undefined_rule"}}
    for request_id, fields in bad.items():
        enqueue(client, prefix, "default", {**base, **fields}, request_id)
    schema = SCHEMAS[0]
    enqueue(client, prefix, "default", {**base, "response_format": {
        "type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}}, "good")
    enqueue(client, prefix, "default", {**base, "max_tokens": 4}, "plain")
    for request_id in [*bad, "good", "plain"]:
        wait_until(lambda r=request_id: is_finished(client, prefix, r), 60, request_id)
    for request_id in bad:
        error = read_result(client, prefix, request_id).terminal
        assert isinstance(error, p.ErrorEvent) and error.code == "invalid_request", error
        assert "does not compile" in error.message or "cannot be used" in error.message
    good = read_result(client, prefix, "good")
    assert isinstance(good.terminal, p.DoneEvent) and good.terminal.finish_reason == "stop"
    jsonschema.validate(json.loads(good.text), schema)
    plain = read_result(client, prefix, "plain")
    assert isinstance(plain.terminal, p.DoneEvent) and len(plain.ids) == 4


NUM_SAMPLES = 4000


def test_speculative_sampling_keeps_the_constrained_distribution() -> None:
    """4,000 seeded samples of a two-character regex through a draft model that disagrees with
    the target: the joint distribution of the two tokens (both drawn under the grammar's mask,
    the second one drafted and verified) passes χ² against the analytic masked target
    distribution, computed by hand from the model's logits (p > 0.001)."""
    import torch

    from helix_daemon.testing.tiny_models import build_tiny_model
    from tests.test_speculative import SMALL_VOCAB, _chi2_pvalue

    with tempfile.TemporaryDirectory() as d:
        target = str(build_tiny_model(f"{d}/t", "llama", seed=1, **SMALL_VOCAB))
        draft = str(build_tiny_model(f"{d}/d", "llama", seed=2, **SMALL_VOCAB))
        engine = make_engine(target, draft=draft, num_speculative_tokens=2,
                             adaptive_speculation=False, num_kv_blocks=2048, max_num_seqs=512,
                             max_num_batched_tokens=4096)
        # ids 1..10 of the tiny tokenizer are single characters; ids past 11 are not in the
        # model's 12-wide head, so the mask (built for the tokenizer's 512) must cut them
        chars = {i: engine.tokenizer.decode([i]) for i in range(1, 11)}
        assert all(len(c) == 1 for c in chars.values()) and len(set(chars.values())) == 10
        first, second = [1, 3, 5, 7, 9], [2, 4, 6, 8]
        regex = "".join("[" + "".join(re.escape(chars[i]) for i in ids) + "]"
                        for ids in (first, second))
        prompt = [3, 1, 4, 1, 5]
        counts: dict[tuple[int, ...], int] = {}
        for start in range(0, NUM_SAMPLES, 500):
            requests = {f"s{i}": (prompt, RequestParams(
                max_tokens=3, sampling=SamplingParams(temperature=1.0, seed=i),
                constraint=OutputConstraint("regex", regex)))
                for i in range(start, start + 500)}
            for tokens, reason in _run(engine, requests).values():
                assert reason == "stop" and len(tokens) == 2
                counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
        model = _dense(target)
        with torch.no_grad():
            p1 = _masked_softmax(model(torch.tensor([prompt])).logits[0, -1], first)
            analytic = {(x1, x2): float(p1[x1] * p2)
                        for x1 in first
                        for x2, p2 in zip(second, _masked_softmax(
                            model(torch.tensor([[*prompt, x1]])).logits[0, -1], second)[second])}
    assert engine.stats().num_draft_proposed > 0
    assert engine.stats().num_draft_accepted < engine.stats().num_draft_proposed
    assert _chi2_pvalue(collections.Counter(counts), analytic) > 0.001


def _masked_softmax(logits: Any, allowed: list[int]) -> Any:
    import torch

    keep = torch.full_like(logits, float("-inf"))
    keep[allowed] = 0.0
    return torch.softmax(logits + keep, dim=-1)
