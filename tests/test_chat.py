"""Chat messages on a real model: SmolLM2-135M-Instruct's own chat template renders them, the
engine's greedy output equals Hugging Face ``generate`` on the same ids, and through Redis a model
without a template answers ``invalid_request`` while the daemon keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from helix_daemon.cli.main import main
from helix_daemon.engine.chat import ChatPrompt, render_chat
from helix_daemon.engine.config import EngineConfig
from helix_daemon.engine.engine import Engine
from helix_daemon.engine.model_files import ResolvedModel
from helix_daemon.wire import protocol as p
from scheduler.errors import InvalidRequestError
from tests.daemon_harness import (
    ThreadDaemon,
    enqueue,
    is_finished,
    one_torch_thread,
    read_result,
    serving_thread_daemon,
    start_thread_daemon,
    wait_until,
)
from tests.engine_utils import greedy
from tests.smollm2 import hf_greedy

MAX_TOKENS = 24
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Name another one."}],
]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here, 4 a plain list
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def engine(first_resolve: ResolvedModel) -> Engine:
    """Helix's engine on the converted SmolLM2 folder, float32 on CPU."""
    return Engine.from_config(EngineConfig(model=first_resolve.path, device="cpu",
                                           dtype="float32", num_kv_blocks=128))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendered_ids_equal_the_template_with_one_bos(engine: Engine,
                                                      messages: list[dict[str, str]]) -> None:
    """Helix's prompt ids for ``messages`` are exactly ``apply_chat_template(tokenize=True,
    add_generation_prompt=True)``; the template's opening BOS is not doubled, and the ids end
    with the assistant turn's opening the generation prompt adds."""
    tokenizer = engine.tokenizer
    ids = render_chat(tokenizer, ChatPrompt(messages))
    assert ids == _template_ids(tokenizer, messages)
    bos = tokenizer.bos_token_id
    assert bos is not None and ids[0] == bos and ids[1] != bos
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_greedy_chat_output_equals_hf_generate(engine: Engine,
                                               hf_from_gguf: tuple[Any, Any]) -> None:
    """Three chat requests at once through ``add_request(ChatPrompt)``: each request's greedy
    tokens equal HF ``generate`` on the template's ids (float32), and its prompt length is the
    template's."""
    model, tokenizer = hf_from_gguf
    with one_torch_thread():
        expected = {f"c{i}": hf_greedy(model, _template_ids(tokenizer, m), MAX_TOKENS)
                    for i, m in enumerate(CONVERSATIONS)}
        for i, messages in enumerate(CONVERSATIONS):
            engine.add_request(f"c{i}", ChatPrompt(messages), greedy(MAX_TOKENS))
        got: dict[str, list[int]] = {r: [] for r in expected}
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
                num_prompt = len(_template_ids(tokenizer, CONVERSATIONS[int(out.request_id[1:])]))
                assert out.num_prompt_tokens == num_prompt
    assert got == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"tokenize": False}, "may not set tokenize"),
    ({"add_generation_prompt": False}, "may not set add_generation_prompt"),
])
def test_reserved_template_kwargs_are_invalid_requests(engine: Engine, kwargs: dict[str, Any],
                                                       message: str) -> None:
    """chat_template_kwargs fill template variables; they cannot change how Helix renders."""
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("k", ChatPrompt(CONVERSATIONS[0], kwargs), greedy(4))
    assert not engine.has_unfinished()


@pytest.fixture(scope="module")
def tiny_daemon(tiny_model_path: Path, redis_url: str) -> Iterator[tuple[ThreadDaemon, str]]:
    prefix = f"helixtest-chat-{id(tiny_model_path):x}"
    with serving_thread_daemon(str(tiny_model_path), redis_url, prefix) as daemon:
        yield daemon, prefix


def test_messages_on_a_model_without_template_is_invalid_request(
        tiny_daemon: tuple[ThreadDaemon, str], redis_url: str) -> None:
    """Through Redis, ``messages`` to a model with no chat template ends that request with an
    ``invalid_request`` error event naming the reason; the next request is served normally."""
    _, prefix = tiny_daemon
    client = redis.Redis.from_url(redis_url)
    enqueue(client, prefix, "default", {"messages": CONVERSATIONS[0], "max_tokens": 4}, "chat")
    enqueue(client, prefix, "default", {"prompt_token_ids": [5, 6, 7], "max_tokens": 4,
                                        "temperature": 0}, "plain")
    for request_id in ("chat", "plain"):
        wait_until(lambda r=request_id: is_finished(client, prefix, r), 60, request_id)
    chat = read_result(client, prefix, "chat").terminal
    assert isinstance(chat, p.ErrorEvent) and chat.code == "invalid_request"
    assert "no chat template" in chat.message
    plain = read_result(client, prefix, "plain")
    assert isinstance(plain.terminal, p.DoneEvent) and len(plain.ids) == 4


@pytest.fixture(scope="module")
def smollm2_daemon(first_resolve: ResolvedModel, redis_url: str) -> Iterator[str]:
    """A daemon on the real SmolLM2 (engine in a thread); yields its key prefix."""
    prefix = f"helixtest-chat-smollm2-{id(first_resolve):x}"
    with one_torch_thread():
        daemon = start_thread_daemon(first_resolve.path, redis_url, prefix, num_kv_blocks=128,
                                     engine_process=False)
        yield prefix
        daemon.stop()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)


def test_messages_through_redis_stop_at_end_of_turn(smollm2_daemon: str, engine: Engine,
                                                    redis_url: str) -> None:
    """A raw XADD with ``messages`` on the real model: the daemon's tokens equal the in-process
    engine's for the same ChatPrompt, the answer is real text, and generation ends on the
    model's end-of-turn token (``<|im_end|>``) with ``finish_reason = stop``."""
    messages = CONVERSATIONS[0]
    with one_torch_thread():
        engine.add_request("ref", ChatPrompt(messages), greedy(64))
        expected: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                expected += out.new_token_ids
    client = redis.Redis.from_url(redis_url)
    enqueue(client, smollm2_daemon, "default",
            {"messages": messages, "max_tokens": 64, "temperature": 0}, "eot")
    wait_until(lambda: is_finished(client, smollm2_daemon, "eot"), 120, "the chat request")
    result = read_result(client, smollm2_daemon, "eot")
    assert result.ids == expected
    assert isinstance(result.terminal, p.DoneEvent) and result.terminal.finish_reason == "stop"
    assert engine.tokenizer.convert_ids_to_tokens(result.ids[-1]) == "<|im_end|>"
    assert "Paris" in engine.tokenizer.decode(result.ids)


def test_cli_submit_system_and_user(smollm2_daemon: str, engine: Engine, redis_url: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``helix submit --system S --user U --stream`` sends those two messages: the streamed text
    is the in-process engine's greedy answer to the same conversation."""
    messages = CONVERSATIONS[1]
    with one_torch_thread():
        engine.add_request("cli-ref", ChatPrompt(messages), greedy(MAX_TOKENS))
        expected: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                expected += out.new_token_ids
        code = main(["submit", "--redis-url", redis_url, "--prefix", smollm2_daemon,
                     "--system", messages[0]["content"], "--user", messages[1]["content"],
                     "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--stream"])
    assert code == 0
    _, text = capsys.readouterr().out.split("\n", 1)
    assert text == engine.tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_cli_submit_refuses_a_system_message_alone(redis_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``--system`` without ``--user`` is a usage error (exit 2), nothing is enqueued."""
    code = main(["submit", "--redis-url", redis_url, "--prefix", "helixtest-chat-none",
                 "--system", "Be brief."])
    assert code == 2 and "--system needs --user" in capsys.readouterr().err


def test_demo_streams_real_answers(cache_dir: Path, first_resolve: ResolvedModel,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`helix demo` (no flags but sizes) serves the bundled SmolLM2 .gguf from the model cache:
    the streamed first answer names Paris, every batch request succeeds, the summary is
    printed."""
    monkeypatch.setenv("HELIX_MODEL_CACHE_DIR", str(cache_dir))  # the session's conversion
    code = main(["demo", "--num-requests", "4", "--max-tokens", "12", "--concurrency", "2",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SmolLM2-135M-Instruct" in out and "Paris" in out
    assert "4 (4 done, 0 failed)" in out and "acceptance rate" in out


def test_cli_batch_lines_with_messages(smollm2_daemon: str, engine: Engine, redis_url: str,
                                       tmp_path: Path) -> None:
    """`helix batch` lines carrying ``messages`` are answered like any request: each result's
    text is the in-process engine's greedy answer to that conversation."""
    lines = [{"id": f"b{i}", "messages": m, "max_tokens": 12, "temperature": 0}
             for i, m in enumerate(CONVERSATIONS)]
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with one_torch_thread():
        expected = {}
        for i, messages in enumerate(CONVERSATIONS):
            engine.add_request(f"b{i}", ChatPrompt(messages), greedy(12))
            expected[f"b{i}"] = []
        while engine.has_unfinished():
            for out in engine.step():
                expected[out.request_id] += out.new_token_ids
        code = main(["batch", "--redis-url", redis_url, "--prefix", smollm2_daemon,
                     str(source), str(results), "--no-progress"])
    assert code == 0
    got = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert {rid: got[rid]["token_ids"] for rid in expected} == expected
