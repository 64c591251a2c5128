"""Tiny random-weight models (and a matching tokenizer) saved to a folder.

Tests, benchmarks and ``helix demo`` use them where no model hub is reachable: they go through the
same ``from_pretrained`` loading path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig


def tiny_config(arch: str = "llama", *, vocab_size: int = 512, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None,
                intermediate_size: int | None = None,
                max_positions: int = 1024) -> PretrainedConfig:
    """A small config of the given family; ``num_kv_heads < num_heads`` gives GQA (Llama only)."""
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0,
            pad_token_id=0, tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_positions, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}")


def build_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0,
                     with_tokenizer: bool = True, **config_kwargs: int) -> Path:
    """Save a random-weight model (and a byte-level BPE tokenizer) to ``path``; return the path."""
    path = Path(path)
    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # stronger-than-default init so that greedy outputs are varied, not one repeated token
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    model.save_pretrained(path)
    if with_tokenizer:
        from helix_daemon.tiny_tokenizer import build_tokenizer

        build_tokenizer(vocab_size=config.vocab_size).save_pretrained(path)
    return path
