"""Device and dtype resolution, and how the KV budget is turned into bytes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helix_daemon.engine.device import (
    AUTO_KV_BYTES_UNKNOWN_DEVICE,
    AUTO_KV_FRACTION,
    free_memory_bytes,
    kv_budget_bytes,
    resolve_device,
    resolve_dtype,
)


def _has_directml() -> bool:
    return importlib.util.find_spec("torch_directml") is not None


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available()
                    or _has_directml(), reason="an accelerator is present: auto picks it")
def test_auto_without_an_accelerator_is_the_cpu_in_float32() -> None:
    """On a machine with no CUDA, DirectML or MPS (this one, CI), `auto` is the CPU and its
    `auto` dtype is float32; naming `cpu` gives the same device."""
    device = resolve_device("auto")
    assert device == torch.device("cpu") == resolve_device("cpu")
    assert resolve_dtype("auto", device) == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_prefers_cuda_in_a_half_precision() -> None:
    """Where CUDA is present, `auto` picks it first, in bfloat16 (float16 without bf16)."""
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_dtype("auto", device) in (torch.bfloat16, torch.float16)


@pytest.mark.skipif(_has_directml(), reason="torch_directml is installed")
def test_unusable_device_names_are_refused() -> None:
    """`directml` without torch_directml says what is missing; a name torch does not know is
    refused rather than silently replaced by the CPU."""
    with pytest.raises(ValueError, match="torch_directml is not installed"):
        resolve_device("directml")
    with pytest.raises(RuntimeError, match="device type at start of device string: gpu"):
        resolve_device("gpu")


def test_dtype_names_resolve_and_unknown_ones_are_refused() -> None:
    """Each named dtype maps to its torch dtype on any device; `auto` is float32 on the CPU and
    float16 on an accelerator that is not CUDA; an unknown name lists the choices."""
    cpu, other = torch.device("cpu"), torch.device("meta")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}
    for name, dtype in names.items():
        assert resolve_dtype(name, cpu) == resolve_dtype(name, other) == dtype
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", other) == torch.float16
    with pytest.raises(ValueError, match=r"unknown dtype 'float13'; choose one of .*float64"):
        resolve_dtype("float13", cpu)


def test_kv_budget_bytes_fraction_bytes_and_auto() -> None:
    """Bytes pass through, a fraction scales free memory, auto is 30 % of free memory."""
    cpu = torch.device("cpu")
    assert kv_budget_bytes(123_456_789, cpu) == 123_456_789
    free = free_memory_bytes(cpu)
    assert 0 < kv_budget_bytes(0.5, cpu) <= free
    auto = kv_budget_bytes(None, cpu)
    # free memory moves on a shared machine: bound by the larger of two readings, loosely
    assert 0 < auto <= AUTO_KV_FRACTION * max(free, free_memory_bytes(cpu)) * 1.5
    with pytest.raises(ValueError, match="positive"):
        kv_budget_bytes(0, cpu)


def test_auto_budget_works_where_free_memory_is_unknown() -> None:
    """A device that cannot report free memory (DirectML) still gets a KV pool under auto,
    while an explicit fraction is refused with a message that says to give bytes."""
    unknown = torch.device("meta")
    assert kv_budget_bytes(None, unknown) == AUTO_KV_BYTES_UNKNOWN_DEVICE
    with pytest.raises(ValueError, match="in bytes"):
        kv_budget_bytes(0.5, unknown)
