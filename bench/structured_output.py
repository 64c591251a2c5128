"""Structured output's cost per step: 64 running sequences of the real SmolLM2-135M-Instruct (its
bundled GGUF, float32 on CPU), all constrained by a JSON schema, against the same 64 unconstrained.

Each run submits 64 sampled requests (the same prompts and seeds), steps until every sequence is
decoding, then times ``steps`` decode steps (median and mean); the two kinds of run alternate
``--repeats`` times (the first run of a process also warms oneDNN's kernels) and the best median
of each kind is compared. The schema asks for a long string
first, so no constrained sequence ends inside the window. Afterwards the constrained requests run
to their end (``--finish``) and the share of outputs that parse and validate is reported.

    python bench/structured_output.py [--steps 20] [--repeats 2] [--finish] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import real_model
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import bundled_model
from scheduler.params import OutputConstraint, RequestParams, SamplingParams

CACHE = Path.home() / ".cache" / "helix-bench"
NUM_SEQS = 64
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["story", "name", "age", "tags"],
    "properties": {"story": {"type": "string", "minLength": 200, "maxLength": 400},
                   "name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "maxItems": 3, "items": {"type": "string",
                                                                      "maxLength": 12}}}}
PROMPT = "Write a JSON object about a fictional person: a short story, a name, an age, tags.\n"


def _params(constrained: bool, seed: int, max_tokens: int) -> RequestParams:
    constraint = OutputConstraint("json_schema", json.dumps(SCHEMA)) if constrained else None
    return RequestParams(max_tokens=max_tokens, ignore_eos=not constrained,
                         sampling=SamplingParams(temperature=1.0, seed=seed),
                         constraint=constraint)


def run(engine: Engine, constrained: bool, steps: int, finish: bool) -> dict[str, Any]:
    """Time ``steps`` decode steps with all 64 sequences running; optionally finish them."""
    for i in range(NUM_SEQS):
        engine.add_request(f"{constrained}-{i}", PROMPT, _params(constrained, i, 400))
    texts: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}

    def step() -> None:
        for out in engine.step():
            texts.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason

    while len(texts) < NUM_SEQS or engine.scheduler.waiting:  # prefill, grammars compiling
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    result: dict[str, Any] = {"median_step_s": statistics.median(times),
                              "mean_step_s": statistics.fmean(times)}
    if finish and constrained:
        while engine.has_unfinished():
            step()
        result["valid"] = sum(_valid(engine, ids) for ids in texts.values())
        result["stopped"] = sum(r == "stop" for r in reasons.values())
    else:
        for request_id in list(texts):
            engine.abort(request_id)
        while engine.has_unfinished():
            step()
    return result


def _valid(engine: Engine, ids: list[int]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(engine.tokenizer.decode(ids)), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--finish", action="store_true", help="run the JSON requests to the end")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    path, _ = real_model(str(bundled_model()), CACHE)
    engine = Engine.from_config(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                             max_num_seqs=NUM_SEQS, num_kv_blocks=2048))
    plains, constraineds = [], []
    for repeat in range(args.repeats):
        plains.append(run(engine, False, args.steps, False))
        constraineds.append(run(engine, True, args.steps, args.finish and repeat == 0))
    plain = min(plains, key=lambda r: r["median_step_s"])
    constrained = min(constraineds, key=lambda r: r["median_step_s"])
    constrained.update({k: v for k, v in constraineds[0].items() if k in ("valid", "stopped")})
    overhead = constrained["median_step_s"] / plain["median_step_s"] - 1
    print(f"{'rows':<14} {'median step ms':>15} {'mean step ms':>13}")
    for name, r in (("unconstrained", plain), ("json schema", constrained)):
        print(f"{name:<14} {r['median_step_s'] * 1e3:>15.1f} {r['mean_step_s'] * 1e3:>13.1f}")
    print(f"overhead (median): {overhead:+.1%}; load average {os.getloadavg()[0]:.2f}")
    if "valid" in constrained:
        print(f"schema-valid: {constrained['valid']}/{NUM_SEQS}, stop: {constrained['stopped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plain": plains, "constrained": constraineds, "overhead": overhead,
                       "load_avg": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
