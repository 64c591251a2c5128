"""Which structured-output library: per-token CPU cost of xgrammar and llguidance, measured here.

For the real SmolLM2 tokenizer (49152 ids) and the tiny test tokenizer (512 ids): the one-off
costs (tokenizer set-up, compiling a nested JSON schema) and, walking the tokens of documents the
grammar accepts, the cost per token of what a decode step does for a constrained row: fill its
mask and accept the sampled token. Also the cost of applying 64 masks to ``[64, vocab]`` logits.

    python bench/grammar_libs.py [--json out.json]

Needs both libraries installed (``pip install xgrammar llguidance``); Helix itself uses one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
            "required": ["city", "zip"]},
        "status": {"enum": ["active", "retired", "unknown"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "status", "score"],
}
DOCS = [
    {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"],
     "address": {"city": "London", "zip": "12345"}, "status": "retired", "score": 9.5},
    {"name": "Grace", "age": 85, "tags": [], "address": {"city": "Arlington", "zip": "22201"},
     "status": "active", "score": -1.25},
]
REGEX = r"[0-9]{3}-[0-9]{4} [A-Za-z ]{1,30}"
REGEX_DOCS = ["555-1234 Main Street", "123-4567 Helix"]


def _time(fn: Callable[[], object], repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, kind: str, source: str) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(source)
        return self.compiler.compile_regex(source)

    def walk(self, compiled: Any, tokens: list[int]) -> float:
        """Seconds per token of fill mask + accept along ``tokens``."""
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        started = time.perf_counter()
        for token in tokens:
            matcher.fill_next_token_bitmask(bitmask, 0)
            if not matcher.accept_token(token):
                raise AssertionError(f"xgrammar refused {token}")
        return (time.perf_counter() - started) / len(tokens)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, kind: str, source: str) -> Any:
        grammar = (self.llg.LLMatcher.grammar_from_json_schema(source) if kind == "json"
                   else self.llg.LLMatcher.grammar_from_regex(source))
        matcher = self.llg.LLMatcher(self.tok, grammar)
        if matcher.is_error():
            raise AssertionError(matcher.get_error())
        return matcher

    def walk(self, compiled: Any, tokens: list[int]) -> float:
        matcher = compiled.deep_copy()
        bitmask = self.llt.allocate_token_bitmask(1, self.vocab)
        started = time.perf_counter()
        for token in tokens:
            self.llt.fill_next_token_bitmask(matcher, bitmask, 0)
            if not matcher.consume_token(token):
                raise AssertionError(f"llguidance refused {token}: {matcher.get_error()}")
        return (time.perf_counter() - started) / len(tokens)


def measure(lib_cls: type, label: str, tokenizer: Any, vocab: int) -> dict[str, Any]:
    started = time.perf_counter()
    lib = lib_cls(tokenizer, vocab)
    setup_s = time.perf_counter() - started
    schema = json.dumps(SCHEMA)
    compile_s = _time(lambda: lib.compile("json", schema))
    compiled = lib.compile("json", schema)
    regex = lib.compile("regex", REGEX)
    json_tokens = [tokenizer.encode(json.dumps(d), add_special_tokens=False) for d in DOCS]
    regex_tokens = [tokenizer.encode(r, add_special_tokens=False) for r in REGEX_DOCS]
    per_json = statistics.median(lib.walk(compiled, t) for t in json_tokens * 5)
    per_regex = statistics.median(lib.walk(regex, t) for t in regex_tokens * 5)
    return {"library": lib.name, "tokenizer": label, "vocab": vocab, "setup_s": setup_s,
            "compile_schema_s": compile_s, "json_us_per_token": per_json * 1e6,
            "regex_us_per_token": per_regex * 1e6}


def apply_cost(vocab: int) -> dict[str, float]:
    """Milliseconds to mask [64, vocab] float32 logits: Helix's way and xgrammar's kernel."""
    from scheduler.grammar import allocate_bitmask, apply_bitmask

    logits = torch.randn(64, vocab)
    bitmask = allocate_bitmask(64, vocab)
    bitmask[:, ::3] = 0x0F0F0F0F
    out = {"helix_ms": _time(lambda: apply_bitmask(logits, bitmask), 20) * 1e3}
    try:
        import xgrammar as xgr

        out["xgrammar_cpu_ms"] = _time(
            lambda: xgr.apply_token_bitmask_inplace(logits.clone(), bitmask), 20) * 1e3
    except ImportError:
        pass
    return out


def _tokenizers() -> list[tuple[str, Any, int]]:
    import tempfile

    from transformers import AutoTokenizer

    from helix_daemon.engine.model_files import bundled_model
    from helix_daemon.testing.tiny_tokenizer import build_tokenizer

    gguf = bundled_model()
    smol = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tiny_dir = tempfile.mkdtemp()
    build_tokenizer(512).save_pretrained(tiny_dir)
    tiny = AutoTokenizer.from_pretrained(tiny_dir)
    return [("smollm2", smol, 49152), ("tiny", tiny, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    for label, tokenizer, vocab in _tokenizers():
        for lib_cls in (XGrammar, LLGuidance):
            rows.append(measure(lib_cls, label, tokenizer, vocab))
    print(f"{'library':<11} {'tokenizer':<9} {'setup s':>8} {'compile s':>10} "
          f"{'json us/tok':>12} {'regex us/tok':>13}")
    for r in rows:
        print(f"{r['library']:<11} {r['tokenizer']:<9} {r['setup_s']:>8.3f} "
              f"{r['compile_schema_s']:>10.4f} {r['json_us_per_token']:>12.1f} "
              f"{r['regex_us_per_token']:>13.1f}")
    apply = {str(v): apply_cost(v) for v in (49152, 512)}
    print("masking [64, vocab] logits (ms):", apply)
    result = {"rows": rows, "apply": apply, "load_avg": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
