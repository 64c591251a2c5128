"""Weight-only int8/int4 linear layers: exact against HF with the same swap, smaller in memory."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helix_daemon.config import DaemonConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import ModelFileError
from helix_daemon.engine.quantized_linear import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize_model,
    weight_bytes,
)
from helix_daemon.testing.tiny_models import build_draft_target_pair
from tests.engine_utils import make_engine, mixed_jobs, model_greedy, run_engine
from tests.tiny import tiny_model

LLAMA = {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 64}
MODES = ("int8", "int4")


@functools.cache
def _quantized_hf(path: str, quantization: str, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    quantize_model(model, quantization)
    return model


def hf_quantized_greedy(path: str, quantization: str, prompt_ids: list[int], max_tokens: int,
                        dtype: torch.dtype = torch.float32) -> list[int]:
    """HF ``generate`` of one request alone on the model with the same quantized modules."""
    return model_greedy(_quantized_hf(path, quantization, dtype), prompt_ids, max_tokens)


@functools.cache
def _reference(path: str, quantization: str) -> dict[str, list[int]]:
    return {j.request_id: hf_quantized_greedy(path, quantization, j.prompt_ids, j.max_tokens)
            for j in mixed_jobs()}


@functools.cache
def _pair() -> tuple[str, str]:
    draft, target = build_draft_target_pair(tempfile.mkdtemp(), tempfile.mkdtemp(),
                                            residual_scale=0.1)
    return str(draft), str(target)


@pytest.mark.parametrize("quantization", MODES)
def test_quantized_linears_replace_every_linear_and_shrink_the_weights(quantization: str) -> None:
    """Every linear layer, the head included, becomes the quantized module; the tied input
    embedding becomes int8 rows; the bytes in memory drop to what the packed forms hold."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama", **LLAMA),
                                                 dtype=torch.float32)
    dense = weight_bytes(model)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert quantize_model(model, quantization) == linears
    kind = Int8Linear if quantization == "int8" else Int4Linear
    assert sum(type(m) is kind for m in model.modules()) == linears
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), kind)
    if model.config.tie_word_embeddings:
        assert isinstance(model.get_input_embeddings(), Int8Embedding)
    # int8: 1 byte a weight plus scales; int4: half a byte plus a scale and zero per 32
    assert weight_bytes(model) < dense * (0.4 if quantization == "int8" else 0.35)


@pytest.mark.parametrize("quantization", MODES)
def test_quantized_linear_matches_its_dequantized_weight(quantization: str) -> None:
    """The kernel's product equals ``F.linear`` on the weight its codes and scales stand for
    (float32 activations), and the quantization error of that weight is small."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    quantized = Int8Linear(linear, torch.float32) if quantization == "int8" \
        else Int4Linear.quantize(linear, torch.float32)
    identity = torch.eye(128)
    dequantized = quantized(identity).T - linear.bias.detach()[:, None]  # columns of W
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, dequantized, linear.bias)
        torch.testing.assert_close(quantized(x), expected, rtol=1e-5, atol=1e-5)
        error = (dequantized - linear.weight).abs().max() / linear.weight.abs().max()
    assert error < (0.01 if quantization == "int8" else 0.1)


def test_float64_is_refused_with_a_clear_error() -> None:
    """The kernels take 32- or 16-bit activations: float64 is refused at load, saying so."""
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        make_engine(tiny_model("llama", **LLAMA), dtype="float64", quantization="int8")


@pytest.mark.parametrize("quantization", MODES)
@pytest.mark.parametrize("name,overrides", [
    ("batched", {"num_kv_blocks": 512, "max_num_batched_tokens": 256}),
    ("preemption", {"num_kv_blocks": 40, "max_num_batched_tokens": 256}),
])
def test_greedy_matches_hf_with_the_same_quantization(quantization: str, name: str,
                                                      overrides: dict[str, int]) -> None:
    """In float32, 18 mixed greedy requests (chunked prefill, batched decode; preemption with the
    small pool) give exactly HF ``generate``'s tokens, each request alone, on the model with the
    same quantized modules."""
    path = tiny_model("llama", **LLAMA)
    engine = make_engine(path, dtype="float32", quantization=quantization, **overrides)
    assert engine.target.quantization == quantization
    assert run_engine(engine, mixed_jobs()) == _reference(path, quantization)
    if name == "preemption":
        assert engine.stats().num_preemptions > 0


@pytest.mark.parametrize("quantization,drafter", [("int4", "model"), ("int8", "ngram")])
def test_speculative_greedy_matches_hf_with_the_same_quantization(quantization: str,
                                                                  drafter: str) -> None:
    """With drafts (a draft model quantized like the target, or n-grams) and a pool small enough
    to preempt, greedy output equals HF ``generate`` of the quantized target alone."""
    draft, target = _pair()
    engine = make_engine(target, dtype="float32", quantization=quantization,
                         draft=draft if drafter == "model" else "ngram",
                         num_speculative_tokens=4, adaptive_speculation=False,
                         num_kv_blocks=40, max_num_batched_tokens=128)
    assert run_engine(engine, mixed_jobs()) == _reference(target, quantization)
    stats = engine.stats()
    assert stats.num_draft_proposed > 0 and stats.num_draft_accepted > 0
    assert stats.num_preemptions > 0
    if drafter == "model":
        assert engine.drafter.runner.quantization == quantization  # type: ignore[union-attr]


def test_draft_quantized_independently_of_the_target() -> None:
    """HELIX_DRAFT_QUANTIZATION=int4 beside an unquantized float32 target: only the draft model
    runs int4, its drafts are accepted, and greedy output (with preemption) equals HF
    ``generate`` of the plain target alone."""
    draft, target = _pair()
    config = DaemonConfig.from_env(
        {"HELIX_DRAFT_QUANTIZATION": "int4"}, model=target, draft=draft, device="cpu",
        dtype="float32", num_speculative_tokens=4, adaptive_speculation=False,
        num_kv_blocks=40, max_num_batched_tokens=128)
    engine = Engine.from_config(config.engine_config())
    assert engine.target.quantization == "none"
    assert engine.drafter.runner.quantization == "int4"  # type: ignore[union-attr]
    jobs = mixed_jobs(8, max_tokens=40)  # fewer than the others: CI time
    reference = {j.request_id: hf_quantized_greedy(target, "none", j.prompt_ids, j.max_tokens)
                 for j in jobs}
    assert run_engine(engine, jobs) == reference
    stats = engine.stats()
    assert stats.num_draft_accepted > 0 and stats.num_preemptions > 0


def test_prequantized_checkpoint_is_refused_at_load(tmp_path: Path) -> None:
    """A checkpoint whose config names a quantizer (here torchao's) is refused at load with an
    error naming the method and what Helix serves instead."""
    folder = tmp_path / "prequantized"
    shutil.copytree(tiny_model("llama", **LLAMA), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao",
                                     "quant_type": {"default": "Int4WeightOnlyConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="pre-quantized checkpoint .*'torchao'.* int8 or int4"):
        make_engine(str(folder), dtype="float32")
