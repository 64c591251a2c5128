"""Device and dtype resolution, and how the KV budget is turned into bytes."""

from __future__ import annotations

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


def test_auto_picks_an_available_device_and_its_dtype() -> None:
    """`auto` resolves to a device this machine has, and CPU computes in float32."""
    device = resolve_device("auto")
    assert device.type in ("cuda", "mps", "privateuseone", "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float64", torch.device("cpu")) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float13", torch.device("cpu"))


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
