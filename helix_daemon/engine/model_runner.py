"""Run a Hugging Face causal LM over the paged KV pool, one packed forward per step.

The model code stays Hugging Face's: a custom attention function registered with
``AttentionInterface`` reads and writes the paged cache, and the per-step metadata reaches it
through keyword arguments of ``model(...)``. So every architecture transformers ships with the
attention interface (Llama, Mistral, Qwen2, GPT-2, ...) runs on the pool without re-implementing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import transformers
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from helix_daemon.engine.cpu_linear import choose_linears
from helix_daemon.engine.gguf_blocks import keep_gguf_blocks
from helix_daemon.engine.model_files import ModelFileError
from helix_daemon.engine.quantized_linear import quantize_model, weight_bytes
from kvpool.attention import AttentionMetadata, paged_attention, write_kv
from kvpool.kv_cache import KVCacheSpec, PagedKVCache

ATTENTION_NAME = "helix_paged"


@dataclass(slots=True)
class ForwardContext:
    """What the attention function needs besides the tensors HF hands it."""

    cache: PagedKVCache
    meta: AttentionMetadata


class _LayerAttention(Protocol):
    """The attention module HF hands the hook: it knows its layer."""

    layer_idx: int


def helix_attention(
    module: _LayerAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None,
    sliding_window: int | None = None, helix: ForwardContext | None = None, **_: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention hook: query ``[1, H, T, D]``, key and value ``[1, Hkv, T, D]`` (packed)."""
    if helix is None:
        raise RuntimeError("helix attention called without a ForwardContext (use ModelRunner)")
    layer = module.layer_idx
    cache = helix.cache
    write_kv(cache.keys[layer], cache.values[layer], key[0].transpose(0, 1),
             value[0].transpose(0, 1), helix.meta.slot_mapping)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(query[0].transpose(0, 1), cache.keys[layer], cache.values[layer],
                          helix.meta, scale, sliding_window, cache.workspace)
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, helix_attention)


def kv_spec_from_config(config: PretrainedConfig, dtype: torch.dtype,
                        device: torch.device) -> KVCacheSpec:
    heads = config.num_attention_heads
    return KVCacheSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        dtype=dtype,
        device=device,
    )


def load_causal_lm(model: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """``from_pretrained`` on a hub id or local folder, with Helix's paged attention plugged in."""
    # transformers 5 renamed torch_dtype to dtype; DirectML users run 4.x (torch 2.4)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    config = AutoConfig.from_pretrained(model)
    refuse_prequantized(model, config)
    loaded = AutoModelForCausalLM.from_pretrained(
        model, config=config, attn_implementation=ATTENTION_NAME, **{dtype_kw: dtype})
    # transformers types ``to`` by ``functools.wraps(nn.Module.to)``, which keeps the unbound
    # ``self`` parameter, so the device looks like the model to mypy.
    return loaded.to(device).eval()  # type: ignore[arg-type]


def refuse_prequantized(model: str, config: PretrainedConfig) -> None:
    """Raise ModelFileError for a checkpoint transformers would load through a quantizer (AWQ,
    GPTQ, torchao, bitsandbytes, ...): Helix's forward and quantized layers do not run them."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) \
        else getattr(quantization, "quant_method", None)
    raise ModelFileError(
        f"model {model} is a pre-quantized checkpoint (quantization_config, quant_method "
        f"{str(method)!r}), which Helix does not serve; use its unquantized checkpoint (with "
        f"--quantization int8 or int4 if wanted) or a .gguf file (--quantization auto keeps "
        f"its Q4_0/Q4_1 blocks)")


class ModelRunner:
    """One model, its paged KV cache, and the packed forward pass.

    ``cpu_linear`` (CPU only): ``auto`` runs the linear layers through oneDNN on packed weights
    when that measures faster at load (``cpu_linear.py``), ``onednn`` always, ``blas`` never.
    ``quantization`` (as ``served_quantization`` resolved it): ``int8`` or ``int4`` swaps the
    linear layers for weight-only quantized ones first (``quantized_linear.py``), ``gguf`` those
    stored as Q4 blocks in ``gguf_file`` for int4 ones on those blocks (``gguf_blocks.py``);
    oneDNN packing then sees only the layers left dense.
    """

    def __init__(self, model: str, dtype: torch.dtype, device: torch.device,
                 cpu_linear: str = "auto", quantization: str = "none",
                 gguf_file: str | None = None) -> None:
        self.model = load_causal_lm(model, dtype, device)
        self.config = self.model.config
        self.dtype = dtype
        self.device = device
        self.num_params = sum(p.numel() for p in self.model.parameters())  # before packing
        self.cpu_linear = cpu_linear
        self.quantization = quantization
        if quantization == "gguf":
            if gguf_file is None:
                raise ValueError("gguf quantization needs the model's .gguf file")
            keep_gguf_blocks(self.model, gguf_file)
        else:
            quantize_model(self.model, quantization)
        self.weight_bytes = weight_bytes(self.model)  # before oneDNN packing hides the bytes
        # the form in use: "onednn" or "blas" on CPU, None elsewhere
        self.linear_form = choose_linears(self.model, cpu_linear) \
            if device.type == "cpu" else None
        self.kv_spec = kv_spec_from_config(self.config, dtype, device)
        self.cache: PagedKVCache | None = None
        self._body = self.model.base_model
        self._head = self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return self._head.out_features

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.cache = PagedKVCache(self.kv_spec, num_blocks, block_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, logit_rows: torch.Tensor) -> torch.Tensor:
        """Run every scheduled token ``[T]``; return logits ``[len(logit_rows), vocab]`` only."""
        if self.cache is None:
            raise RuntimeError("allocate_cache() before forward()")
        hidden = self._body(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
            helix=ForwardContext(self.cache, meta),
        ).last_hidden_state[0]
        return self._head(hidden[logit_rows])


def load_config(model: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model)
