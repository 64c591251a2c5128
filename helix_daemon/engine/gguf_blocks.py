"""``--quantization auto`` on a GGUF file: its Q4_0/Q4_1 blocks served as they are, as int4.

A Q4 block is 32 weights along a row's input, one fp16 scale ``d`` (and, in Q4_1, an fp16 minimum
``m``) and 32 four-bit codes ``q``: ``w = d·q + m`` (Q4_1) or ``w = d·(q - 8)`` (Q4_0). That is
``Int4Linear`` with group 32, scale ``d`` and low ``m`` (``-8d``): the codes and scales are copied
from the file, never re-quantized. In float32 the weight the kernel computes with equals the
``gguf`` package's dequantization bit for bit (``tests/test_gguf_blocks.py``): ``(q - 8)·d`` is
exact (4 by 11 significant bits) and the zero ``m + 8d`` is exact for every block of SmolLM2's
file, so one rounding of ``d·q + m`` happens on both sides. In bfloat16 the scale and zero are
rounded to 8 significant bits (the error is stated in the README).

The model itself is the one Helix loads from the file's dequantized folder; this module then
swaps each linear layer whose GGUF tensor is Q4_0/Q4_1 for the int4 form of the file's blocks.
Names come from transformers' own GGUF loader (``get_gguf_hf_weights_map``), and so does the row
order: its per-architecture processor (Llama's un-permuting of q and k) is run on row numbers and
the blocks are taken in the order it returns. Tensors of other types, layers that are not
``torch.nn.Linear`` (embeddings), and tensors whose processing is more than a row reordering keep
the dequantized weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from transformers import PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from helix_daemon.engine.quantized_linear import INT4_GROUP, KERNEL_DTYPES, Int4Linear

log = logging.getLogger(__name__)

KEPT_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def keep_gguf_blocks(model: PreTrainedModel, gguf_file: str | Path) -> int:
    """Swap ``model``'s linear layers stored as Q4_0/Q4_1 in ``gguf_file`` for ``Int4Linear``
    on the file's own blocks, in place; returns how many were swapped."""
    dtype = next(model.parameters()).dtype
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"GGUF Q4 blocks need activations in float32, bfloat16 or float16 (the "
                         f"int4 kernel's input types), not {dtype}")
    reader = GGUFReader(gguf_file)
    processor = _processor(reader, model)
    hf_names = get_gguf_hf_weights_map(model, processor)
    swaps: dict[str, Int4Linear] = {}
    for tensor in reader.tensors:
        name = hf_names.get(tensor.name, "")
        if tensor.tensor_type in KEPT_TYPES and name.endswith(".weight"):
            module = _int4_module(model, name.removesuffix(".weight"), tensor, processor, dtype)
            if module is not None:
                swaps[name.removesuffix(".weight")] = module
    for name, module in swaps.items():
        model.set_submodule(name, module)
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    log.info("gguf: %d linear layers keep their Q4 blocks as int4; file types %s",
             len(swaps), ", ".join(kinds))
    return len(swaps)


def _processor(reader: GGUFReader, model: PreTrainedModel) -> TensorProcessor:
    """transformers' tensor processor for the file's architecture, as its own loader picks it."""
    architecture = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())


def _int4_module(model: torch.nn.Module, name: str, tensor: ReaderTensor,
                 processor: TensorProcessor, dtype: torch.dtype) -> Int4Linear | None:
    """The int4 form of ``tensor``'s blocks for the linear layer ``name``; None where the layer
    or the loader's processing does not allow it (the dequantized weight stays)."""
    linear = model.get_submodule(name)
    rows = int(tensor.data.shape[0])
    columns = int(tensor.shape[0])  # GGUF lists dimensions innermost first
    if type(linear) is not torch.nn.Linear or tuple(linear.weight.shape) != (rows, columns):
        return None
    order = _row_order(processor, tensor.name, rows)
    if order is None:
        log.info("gguf: %s is processed beyond a row reordering; dequantized", tensor.name)
        return None
    blocks = np.ascontiguousarray(np.asarray(tensor.data)[order])
    return int4_from_blocks(blocks, tensor.tensor_type, linear.bias, dtype)


def _row_order(processor: TensorProcessor, name: str, rows: int) -> np.ndarray | None:
    """The order transformers' loader puts the tensor's rows in, found by processing the row
    numbers as if they were the weights; None when the processing does more than reorder rows
    (renames, reshapes or changes values)."""
    numbers = np.arange(rows, dtype=np.float64)[:, None]
    try:
        result = processor.process(weights=numbers, name=name, tensor_key_mapping={},
                                   parsed_parameters={"tensors": {}, "config": processor.config})
    except (ValueError, IndexError, KeyError, TypeError):
        return None  # it reshapes the weights: a column of row numbers does not fit
    weights = result.weights
    if result.name != name or not isinstance(weights, np.ndarray) or weights.shape != (rows, 1) \
            or not np.array_equal(np.sort(weights[:, 0]), numbers[:, 0]):
        return None
    return weights[:, 0].astype(np.int64)


def int4_from_blocks(blocks: np.ndarray, kind: GGMLQuantizationType,
                     bias: torch.nn.Parameter | None, dtype: torch.dtype) -> Int4Linear:
    """``Int4Linear`` holding Q4_0/Q4_1 ``blocks`` (uint8 ``[out, in / 32 * block bytes]``)."""
    block_size, block_bytes = GGML_QUANT_SIZES[kind]
    assert block_size == INT4_GROUP
    raw = torch.from_numpy(blocks).reshape(blocks.shape[0], -1, block_bytes)
    scale = _fp16(raw[..., 0:2])  # [out, groups]
    if kind == GGMLQuantizationType.Q4_1:
        low, nibbles = _fp16(raw[..., 2:4]), raw[..., 4:]
    else:  # Q4_0: codes centred on 8
        low, nibbles = -8 * scale, raw[..., 2:]
    # byte j of a block holds weight j in its low nibble and weight j + 16 in its high one
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(blocks.shape[0], -1)
    return Int4Linear(codes.to(torch.int32), scale, low, bias, dtype)


def _fp16(pairs: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 values from ``[..., 2]`` bytes, as float32 ``[...]`` (exact)."""
    return pairs.contiguous().view(torch.float16)[..., 0].float()
