"""How a text ``prompt`` becomes token ids: with the special tokens the model's tokenizer adds by
itself (a BOS for a Llama-style tokenizer), as vLLM's completions and ``tokenizer(text)`` do;
``prompt_token_ids`` are used as given."""

from __future__ import annotations

import shutil

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.testing.tiny_tokenizer import EOS_TOKEN
from tests.engine_utils import greedy
from tests.tiny import tiny_model

PROMPT = "The scheduler packs every running sequence"


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with a tokenizer that prepends BOS (id 0) as Llama's tokenizers do."""
    folder = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_model(), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A $B", special_tokens=[(EOS_TOKEN, 0)])
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(engine: Engine, prompt: str | list[int]) -> tuple[int, list[int]]:
    """(prompt length the engine reports, greedy output ids) of one request run alone."""
    engine.add_request("r", prompt, greedy(8, ignore_eos=True))
    num_prompt, tokens = 0, []
    while engine.has_unfinished():
        for out in engine.step():
            num_prompt = out.num_prompt_tokens
            tokens += out.new_token_ids
    return num_prompt, tokens


@pytest.mark.parametrize("adds_bos", [True, False])
def test_text_prompt_gets_the_tokenizers_own_special_tokens(bos_model: str, adds_bos: bool
                                                           ) -> None:
    """A text prompt runs exactly as ``prompt_token_ids = tokenizer(text).input_ids``: one BOS in
    front where the tokenizer adds one, none where it does not (the stock tiny tokenizer)."""
    path = bos_model if adds_bos else tiny_model()
    engine = Engine.from_config(EngineConfig(model=path, device="cpu", dtype="float32",
                                             num_kv_blocks=32))
    plain = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    expected_ids = [0, *plain] if adds_bos else plain
    assert engine.tokenizer(PROMPT).input_ids == expected_ids
    assert _run(engine, PROMPT) == _run(engine, expected_ids)
    assert _run(engine, PROMPT)[0] == len(expected_ids)


def test_token_ids_are_used_as_given(bos_model: str) -> None:
    """``prompt_token_ids`` never get a BOS added: the reported prompt length is theirs."""
    engine = Engine.from_config(EngineConfig(model=bos_model, device="cpu", dtype="float32",
                                             num_kv_blocks=32))
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert _run(engine, ids)[0] == len(ids)
