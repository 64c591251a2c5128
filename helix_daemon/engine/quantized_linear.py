"""Weight-only quantized linear layers: int8 per output channel, or int4 in groups of 32.

``quantize_model`` swaps every ``torch.nn.Linear`` (the output head included) for a module that
keeps only the quantized weight and multiplies with torch's own weight-only kernels,
``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``; activations stay in the
serving dtype. Swapping modules, as ``cpu_linear.py`` does, keeps Helix's paged attention hook
and every architecture working, and the same function applied to a Hugging Face model gives the
exactness reference.

Why torch's ops and not torchao: they ship with torch (no new dependency, no version coupling of a
fast-moving library to torch 2.13), torchao's CPU int4 layout runs this same aten kernel, and
holding the scale/zero layout ourselves is what lets GGUF's Q4_0/Q4_1 blocks map onto it later.
Measured on the shared 2-core AMD EPYC (AVX2, no AVX512-BF16) over SmolLM2-135M's layer shapes
plus its head: both kernels take float32 activations but run 5-20x slower than float32
``F.linear`` with them, while with bfloat16 activations int4 ran 2.4x faster than float32
``F.linear`` at 1 row and int8 1.7x. So ``--dtype auto`` with a quantization serves bfloat16 on
CPU (``serving_dtype``); float32 stays available and is what the exactness tests use.

The head and tied embeddings: the head is quantized like every linear (it is the largest matrix
of small models). A tied input embedding would otherwise keep the whole float matrix alive, so it
is stored as int8 rows with one scale per row (``Int8Embedding``): a lookup reads a few rows, and
the error per row is that of int8.

Layers whose input width is not a multiple of the group size stay ``torch.nn.Linear`` under
int4. Both run on CPU only for now: torch's CUDA int4 kernel takes another packing, and neither
path has been run on a GPU here, so other devices get a clear error at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix_daemon.engine.config import QUANTIZATION_CHOICES

INT4_GROUP = 32  # GGUF's Q4 block size; the kernel's group size
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT4_LEVELS = 15  # codes 0..15; the kernel computes (code - 8) * scale + zero


class Int8Linear(torch.nn.Module):
    """``y = x · (q · s)ᵀ + b`` with ``q`` int8 ``[out, in]`` and one scale ``s`` per output."""

    qweight: torch.Tensor  # buffers: moved with the model, counted by weight_bytes, not trained
    scale: torch.Tensor

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(weight / scale[:, None])
                             .clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        return _finish(y, x, self.bias, self.out_features)


class Int4Linear(torch.nn.Module):
    """Asymmetric int4 in groups of ``INT4_GROUP`` along the input: ``w = q · s + m`` per group,
    held as the kernel's packed codes and ``[in / group, out, 2]`` (scale, zero) pairs.

    Built from codes (``quantize`` makes them from a float layer; ``gguf_blocks.py`` takes them
    from a GGUF file's Q4_0/Q4_1 blocks as they are)."""

    packed: torch.Tensor
    scale_zero: torch.Tensor

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 bias: torch.nn.Parameter | None, dtype: torch.dtype) -> None:
        """Hold ``w = codes · scale + low``: codes int32 ``[out, in]`` in 0..15, scale and low
        float32 ``[out, in / group]``."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        zero = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
        pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", pairs.to(dtype))
        self.bias = bias

    @classmethod
    def quantize(cls, linear: torch.nn.Linear, dtype: torch.dtype) -> Int4Linear:
        """Round ``linear``'s weight to 16 levels between each group's minimum and maximum."""
        out_f, in_f = linear.out_features, linear.in_features
        groups = linear.weight.detach().float().reshape(out_f, in_f // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = (high - low).clamp(min=1e-12) / _INT4_LEVELS
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, _INT4_LEVELS)
        return cls(codes.reshape(out_f, in_f).to(torch.int32), scale, low, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP,
                                                       self.scale_zero)
        return _finish(y, x, self.bias, self.out_features)


class Int8Embedding(torch.nn.Module):
    """An embedding table as int8 rows with one scale per row; looks rows up, then scales them."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embedding: torch.nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        weight = embedding.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(weight / scale).clamp(-127, 127)
                             .to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.dtype) * F.embedding(ids, self.scale)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def serving_dtype(quantization: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``--dtype auto`` means under ``quantization``; None: the device's usual one."""
    if quantization != "none" and device.type == "cpu":
        return torch.bfloat16  # the kernels' fast path (see the module docstring)
    return None


def served_quantization(asked: str, gguf: str | None, device: torch.device) -> str:
    """What ``--quantization asked`` serves for one checkpoint (``gguf``: its source file, if
    any): ``auto`` keeps a GGUF file's own Q4 blocks ("gguf") and is ``none`` for any other
    checkpoint. Raises ValueError for a name it does not know or a device it does not run on."""
    if asked not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, "
                         f"got {asked!r}")
    served = ("gguf" if gguf else "none") if asked == "auto" else asked
    check_supported(served, device)
    return served


def check_supported(quantization: str, device: torch.device) -> None:
    if quantization != "none" and device.type != "cpu":  # the GPU kernels are not tested yet
        raise ValueError(f"{quantization} quantization runs on CPU only for now, not on "
                         f"{device.type}; use --quantization none")


def quantize_model(model: torch.nn.Module, quantization: str) -> int:
    """Swap ``model``'s linear layers (and a tied input embedding) for quantized ones in place.

    Returns how many linear layers were swapped. ``none`` leaves the model as it is.
    """
    if quantization == "none":
        return 0
    if quantization not in ("int8", "int4"):
        raise ValueError(f"quantize_model takes none, int8 or int4, not {quantization!r}")
    device = next(model.parameters()).device
    check_supported(quantization, device)
    dtype = next(model.parameters()).dtype
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"{quantization} quantization needs activations in float32, bfloat16 or "
                         f"float16 (the kernels' input types), not {dtype}")
    make = Int8Linear if quantization == "int8" else Int4Linear.quantize
    swaps = {name: make(module, dtype) for name, module in model.named_modules()
             if type(module) is torch.nn.Linear and _fits(module, quantization)}
    embeddings = _tied_embedding(model)
    for name, module in swaps.items():
        model.set_submodule(name, module)
    if embeddings is not None:  # a PreTrainedModel: _tied_embedding found its accessors
        model.set_input_embeddings(Int8Embedding(embeddings, dtype))  # type: ignore[operator]
    return len(swaps)


def _fits(linear: torch.nn.Linear, quantization: str) -> bool:
    return quantization == "int8" or linear.in_features % INT4_GROUP == 0


def _tied_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it shares its matrix with the head (which is being quantized)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    emb, head = get_in(), get_out()
    if isinstance(emb, torch.nn.Embedding) and isinstance(head, torch.nn.Linear) \
            and emb.weight is head.weight:
        return emb
    return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
