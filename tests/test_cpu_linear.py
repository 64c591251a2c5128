"""Linear layers on oneDNN's packed weights compute what ``F.linear`` does, in the engine too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helix_daemon.engine.cpu_linear import PackedLinear, choose_linears, onednn_available
from helix_daemon.engine.model_runner import load_causal_lm
from tests.engine_utils import make_engine, mixed_jobs, run_engine
from tests.tiny import tiny_model

needs_onednn = pytest.mark.skipif(not onednn_available(torch.float32),
                                  reason="this torch build has no oneDNN")
LLAMA = {"num_heads": 4, "num_kv_heads": 2, "hidden_size": 64}


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(bias: bool) -> None:
    """Every row count a step produces (1 to a prefill chunk, flat or batched) gives F.linear's
    result up to float32 rounding, with and without a bias."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(linear)
    for shape in [(1, 96), (2, 96), (3, 96), (5, 96), (8, 96), (1, 7, 96), (1, 300, 96)]:
        x = torch.randn(shape)
        expected = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_choose_linears_packs_every_linear_and_drops_dense_weights() -> None:
    """``onednn`` replaces every ``nn.Linear`` and frees their dense weights; ``blas`` and a
    float64 model (which oneDNN cannot take) keep them; an unknown choice is an error."""
    path = tiny_model("llama", **LLAMA)
    model = load_causal_lm(path, torch.float32, torch.device("cpu"))
    before = sum(p.numel() for p in model.parameters())
    assert choose_linears(model, "onednn") == "onednn"
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < before

    kept = load_causal_lm(path, torch.float32, torch.device("cpu"))
    assert choose_linears(kept, "blas") == "blas"
    double = load_causal_lm(path, torch.float64, torch.device("cpu"))
    assert choose_linears(double, "onednn") == "blas"
    assert any(type(m) is torch.nn.Linear for m in double.modules())
    with pytest.raises(ValueError, match="cpu linear"):
        choose_linears(kept, "fast")


@needs_onednn
@pytest.mark.parametrize("choice", ["onednn", "auto"])
def test_engine_greedy_same_with_packed_linears(choice: str) -> None:
    """In float32, 18 mixed greedy requests (prefill chunks, batched decode) give the same tokens
    with packed oneDNN linears (forced, or when the load-time measurement picks them) as with
    ``F.linear``; with ``auto`` the runner reports which form it measured faster."""
    path = tiny_model("llama", **LLAMA)
    jobs = mixed_jobs()
    overrides = {"dtype": "float32", "num_kv_blocks": 512, "max_num_batched_tokens": 256}
    blas = make_engine(path, cpu_linear="blas", **overrides)
    assert blas.target.linear_form == "blas"
    engine = make_engine(path, cpu_linear=choice, **overrides)
    assert engine.target.linear_form in ({"onednn"} if choice == "onednn" else {"onednn", "blas"})
    assert run_engine(engine, jobs) == run_engine(blas, jobs)
