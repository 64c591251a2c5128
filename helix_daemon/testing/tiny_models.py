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
        from helix_daemon.testing.tiny_tokenizer import build_tokenizer

        # a model with a tiny vocabulary still gets a usable tokenizer: its ids decode to bytes
        build_tokenizer(vocab_size=max(config.vocab_size, 512)).save_pretrained(path)
    return path


def build_draft_target_pair(draft_path: str | Path, target_path: str | Path, *,
                            extra_layers: int = 2, residual_scale: float = 0.1, seed: int = 0,
                            **config_kwargs: int) -> tuple[Path, Path]:
    """A Llama draft and a deeper target that agree the way a real pair does, most of the time.

    Random independent models almost never agree, which would make speculation look useless.
    Here the target is the draft plus ``extra_layers`` whose output projections are scaled by
    ``residual_scale``: its embeddings, first layers and head are the draft's, and the extra
    layers nudge the distribution. Smaller ``residual_scale`` means higher acceptance.
    """
    draft_path = build_tiny_model(draft_path, "llama", seed=seed, with_tokenizer=True,
                                  **config_kwargs)
    draft = AutoModelForCausalLM.from_pretrained(draft_path)
    num_draft_layers = draft.config.num_hidden_layers
    config = tiny_config("llama", **{**config_kwargs,
                                     "num_layers": num_draft_layers + extra_layers})
    torch.manual_seed(seed + 1)
    target = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in target.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
        target.load_state_dict(draft.state_dict(), strict=False)
        for layer in target.model.layers[num_draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    target_path = Path(target_path)
    target.save_pretrained(target_path)
    from helix_daemon.testing.tiny_tokenizer import build_tokenizer

    build_tokenizer(vocab_size=max(config.vocab_size, 512)).save_pretrained(target_path)
    return draft_path, target_path
