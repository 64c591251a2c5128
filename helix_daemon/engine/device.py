"""Pick the device and dtype a model runs on, and how much memory it has free."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` tries CUDA, then DirectML (when ``torch_directml`` imports), then MPS, then CPU."""
    if name == "directml" or (name == "auto" and not torch.cuda.is_available()):
        device = _directml_device()
        if device is not None:
            return device
        if name == "directml":
            raise ValueError("device 'directml' asked for but torch_directml is not installed")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def _directml_device() -> torch.device | None:
    try:
        import torch_directml
    except ImportError:
        return None
    return torch_directml.device()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA when supported, float16 on other accelerators, float32 on CPU."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or auto")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.float32
    return torch.float16


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free on ``device``; used to size the KV pool from a fraction."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise ValueError(f"cannot query free memory on {device}; give the KV budget in bytes")


# "auto": this share of free memory, or a fixed size where free memory cannot be queried
AUTO_KV_FRACTION = 0.3
AUTO_KV_BYTES_UNKNOWN_DEVICE = 2 * 2**30


def kv_budget_bytes(budget: float | int | None, device: torch.device) -> int:
    """A budget ``<= 1`` is a fraction of free device memory; a larger one is bytes.

    ``None`` (auto) is 30 % of free memory, or 2 GiB on a device that cannot report its free
    memory (DirectML): a first run with default settings must work everywhere.
    """
    if budget is None:
        try:
            return int(free_memory_bytes(device) * AUTO_KV_FRACTION)
        except ValueError:
            return AUTO_KV_BYTES_UNKNOWN_DEVICE
    if budget <= 0:
        raise ValueError(f"KV budget must be positive, got {budget}")
    if budget <= 1:
        return int(free_memory_bytes(device) * budget)
    return int(budget)
