"""``--quantization auto`` on a GGUF file: its Q4_0/Q4_1 blocks become int4 layers as they are.

The weight the int4 kernel computes with equals the ``gguf`` package's dequantization (and so HF's
own load of the file) bit for bit in float32; the model holds the packed 4-bit form; and Helix's
greedy output equals HF ``generate`` on the model with the same swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.gguf_blocks import int4_from_blocks, keep_gguf_blocks
from helix_daemon.engine.model_files import ResolvedModel
from helix_daemon.engine.quantized_linear import Int4Linear, weight_bytes
from tests.daemon_harness import one_torch_thread
from tests.engine_utils import run_engine
from tests.smollm2 import hf_greedy
from tests.test_quantized_real import EXACT_JOBS, EXACT_TOKENS, _jobs

Q4_0, Q4_1 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1


def _dequantized(module: Int4Linear) -> torch.Tensor:
    """The weight ``[out, in]`` the kernel computes with: its product with the identity (each
    output is one weight times 1 plus zeros, so nothing is rounded on the way)."""
    with torch.no_grad():
        return module(torch.eye(module.in_features, dtype=module.scale_zero.dtype)).T


def _q4_1_zero_is_exact(blocks: np.ndarray) -> bool:
    """Whether ``m + 8d`` (the kernel's zero) is exact in float32 for every Q4_1 block."""
    raw = blocks.reshape(-1, 20)
    d = raw[:, 0:2].copy().view(np.float16)[:, 0]
    m = raw[:, 2:4].copy().view(np.float16)[:, 0]
    exact = m.astype(np.float64) + 8 * d.astype(np.float64)
    return bool(np.array_equal((m.astype(np.float32) + 8 * d.astype(np.float32)), exact))


@pytest.mark.parametrize("kind", [Q4_0, Q4_1])
def test_q4_blocks_give_ggufs_dequantization_bit_for_bit(kind: GGMLQuantizationType) -> None:
    """Random weights quantized by the ``gguf`` package: the int4 module built from the blocks
    computes with exactly gguf's dequantized weight in float32; in bfloat16 (scale and zero
    rounded to 8 significant bits) within 2^-7 of the largest weight."""
    weight = np.random.default_rng(0).normal(size=(48, 128)).astype(np.float32)
    blocks = quantize(weight, kind)
    expected = torch.from_numpy(dequantize(blocks, kind))
    assert torch.equal(_dequantized(int4_from_blocks(blocks, kind, None, torch.float32)),
                       expected)
    in_bf16 = _dequantized(int4_from_blocks(blocks, kind, None, torch.bfloat16)).float()
    assert (in_bf16 - expected).abs().max() <= 2 ** -7 * expected.abs().max()


def test_smollm2_serves_its_q4_1_blocks_packed_and_bit_exact(
        first_resolve: ResolvedModel, gguf: Path) -> None:
    """Every linear layer SmolLM2's file stores as Q4_1 (7 per layer) becomes int4 on the file's
    blocks, held packed (half a byte a weight); the head stays dense (tied to the Q8_0
    embedding, dequantized). Layer 0's weights, q and k (rows reordered by transformers'
    loader) included, equal HF's own float32 load of the file bit for bit, and the zero of
    every Q4_1 block of the file is exact in float32, so the rest are too."""
    model = AutoModelForCausalLM.from_pretrained(first_resolve.path, dtype=torch.float32).eval()
    dense_bytes = weight_bytes(model)
    layer0 = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if name.startswith("model.layers.0.") and type(module) is torch.nn.Linear}
    assert keep_gguf_blocks(model, gguf) == 7 * model.config.num_hidden_layers
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert [n for n, m in model.named_modules() if type(m) is torch.nn.Linear] == ["lm_head"]
    for module in int4.values():
        assert module.packed.nbytes == module.out_features * module.in_features // 2
    with one_torch_thread():
        for name, weight in layer0.items():
            assert torch.equal(_dequantized(int4[name]), weight), name
    reader = GGUFReader(gguf)
    assert all(_q4_1_zero_is_exact(np.asarray(t.data)) for t in reader.tensors
               if t.tensor_type == Q4_1)
    print(f"weights: {dense_bytes / 1e6:.0f} MB float32, "
          f"{weight_bytes(model) / 1e6:.0f} MB with the Q4_1 blocks (float32 scales)")
    assert weight_bytes(model) < 0.4 * dense_bytes


def test_auto_greedy_equals_hf_with_the_same_blocks(first_resolve: ResolvedModel, gguf: Path,
                                                    cache_dir: Path) -> None:
    """``--quantization auto`` on the .gguf in float32: two conversations arriving a step apart,
    with n-gram drafts (verified in the same passes as plain decoding), give exactly HF
    ``generate``'s tokens on the model with the same Q4_1 blocks swapped in; the answer to the
    capital question is right. (The kernel's float32 path is slow: batching, preemption and
    both drafters at length run on tiny models in test_quantized.py, on the same Int4Linear.)"""
    path = first_resolve.path
    jobs = _jobs(path, EXACT_JOBS, EXACT_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    keep_gguf_blocks(hf, gguf)
    reference = {j.request_id: hf_greedy(hf, j.prompt_ids, j.max_tokens) for j in jobs}
    engine = Engine.from_config(EngineConfig(
        model=str(gguf), model_cache_dir=str(cache_dir), draft="ngram", device="cpu",
        dtype="float32", quantization="auto", num_kv_blocks=256, adaptive_speculation=False))
    assert engine.info().quantization == "gguf"
    assert run_engine(engine, jobs) == reference
    assert "Paris" in AutoTokenizer.from_pretrained(path).decode(reference["c0"])


def test_auto_serves_bfloat16_by_default_and_answers_sensibly(
        first_resolve: ResolvedModel, gguf: Path, cache_dir: Path) -> None:
    """With ``--dtype auto`` the Q4_1 blocks serve in bfloat16 (the kernel's fast path on CPU),
    with under a quarter of float32's weight bytes, and the capital question is answered."""
    jobs = _jobs(first_resolve.path, (0,), EXACT_TOKENS)
    with one_torch_thread():
        engine = Engine.from_config(EngineConfig(
            model=str(gguf), model_cache_dir=str(cache_dir), device="cpu",
            quantization="auto", num_kv_blocks=64))
        answer = run_engine(engine, jobs)["c0"]
    assert engine.target.dtype == torch.bfloat16
    print(f"bfloat16 with the Q4_1 blocks: {engine.weight_bytes / 1e6:.0f} MB")
    assert engine.weight_bytes < 0.25 * 4 * engine.target.num_params  # float32's bytes
    assert "Paris" in AutoTokenizer.from_pretrained(first_resolve.path).decode(answer)
