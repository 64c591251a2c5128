"""OpenAI's Batch API on the gateway, with the official ``openai`` package: files, batches,
polling, output and error files, cancel, and a gateway killed with SIGKILL mid-batch whose
batch another replica finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from helix_daemon.client import HelixClient
from helix_daemon.gateway.config import GatewayConfig
from tests.conftest import free_port
from tests.daemon_harness import REPO, ThreadDaemon, base_env, start_thread_daemon, wait_until
from tests.gateway_harness import GatewayServer

FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def daemon(tiny_model_path: Path, redis_url: str, module_prefix: str) -> Iterator[ThreadDaemon]:
    d = start_thread_daemon(str(tiny_model_path), redis_url, module_prefix)
    yield d
    d.stop()


WINDOW = 2  # lines of one batch in the queue at once, small so that it shows


@pytest.fixture(scope="module")
def gateway(daemon: ThreadDaemon, redis_url: str, module_prefix: str) -> Iterator[GatewayServer]:
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix,
                                         batch_window=WINDOW)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def helix(daemon: ThreadDaemon, redis_url: str, module_prefix: str) -> Iterator[HelixClient]:
    with HelixClient.from_url(redis_url, prefix=module_prefix) as c:
        yield c


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _line(custom_id: str, prompt: str, **params: Any) -> dict[str, Any]:
    body = {"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def _run(client: openai.OpenAI, lines: list[dict[str, Any]], window: str = "24h") -> Any:
    upload = client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                 completion_window=window)


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 120,
          queue_depths: list[int] | None = None, helix: HelixClient | None = None) -> Any:
    """Poll to a final status; the statuses seen (and, with ``helix``, the queue's depth at
    each poll)."""
    seen: list[str] = []

    def final() -> bool:
        if helix is not None and queue_depths is not None:
            queue_depths.append(helix.status().length)
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        return batch.status in FINAL

    wait_until(final, timeout_s, f"batch {batch_id} to end", interval_s=0.1)
    return client.batches.retrieve(batch_id), seen


def _answers(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line]


def test_batch_end_to_end(client: openai.OpenAI, helix: HelixClient) -> None:
    """Upload, create, poll to ``completed``: every custom_id is answered once, valid lines in
    the output file with the text the same greedy request gets through the Redis client, the
    invalid line in the error file with a 400 body; request_counts and the listing agree; the
    queue never held more than the window's lines of the batch."""
    prompts = {f"req-{i}": p for i, p in enumerate(["Once", "Hello there", "The day", "Why",
                                                    "Where", "Who"])}
    lines = [_line(cid, p, max_tokens=24, ignore_eos=True) for cid, p in prompts.items()]
    lines.append(_line("bad", "x", logprobs=2))
    batch = _run(client, lines)
    assert batch.status == "validating" and batch.endpoint == "/v1/completions"
    depths: list[int] = []
    done, statuses = _wait(client, batch.id, queue_depths=depths, helix=helix)
    assert max(depths) <= WINDOW
    assert done.status == "completed" and statuses[-1] == "completed"
    assert statuses == sorted(statuses, key=["validating", "in_progress", "finalizing",
                                             "completed"].index)
    assert done.request_counts.model_dump() == {"total": 7, "completed": 6, "failed": 1}
    output = _answers(client, done.output_file_id)
    errors = _answers(client, done.error_file_id)
    assert sorted(a["custom_id"] for a in output) == sorted(prompts)
    assert [a["custom_id"] for a in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "logprobs"
    for answer in output:
        direct = helix.result(helix.submit(prompts[answer["custom_id"]], max_tokens=24,
                                           ignore_eos=True, temperature=0), timeout_s=60)
        body = answer["response"]["body"]
        assert answer["response"]["status_code"] == 200 and answer["error"] is None
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == direct.text
        assert body["usage"]["completion_tokens"] == direct.usage["completion_tokens"]
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_an_unreadable_file_fails_the_batch(client: openai.OpenAI) -> None:
    """A file with a repeated custom_id fails the batch in validation, with the reason in
    ``errors``; nothing of it is answered."""
    batch = _run(client, [_line("same", "a"), _line("same", "b")])
    done, _ = _wait(client, batch.id)
    assert done.status == "failed" and done.output_file_id is None
    assert "not unique" in done.errors.data[0].message


def test_unknown_files_and_purposes_are_refused(client: openai.OpenAI) -> None:
    """A batch naming a missing file is 404; an upload with another purpose is 400."""
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/completions",
                              completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")


def test_cancel_ends_the_batch_with_every_line_answered(client: openai.OpenAI,
                                                        daemon: ThreadDaemon) -> None:
    """Cancelling a running batch of long lines: ``cancelling`` then ``cancelled``, every
    custom_id answered exactly once (cancelled lines in the error file), KV blocks freed."""
    lines = [_line(f"long-{i}", "Once", max_tokens=3000, ignore_eos=True) for i in range(4)]
    batch = _run(client, lines)
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 60,
               "the batch to start")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done, _ = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    answered = _answers(client, done.output_file_id) + _answers(client, done.error_file_id)
    assert sorted(a["custom_id"] for a in answered) == sorted(line["custom_id"]
                                                              for line in lines)
    wait_until(lambda: daemon.kv_blocks_used() == 0, 30, "the KV blocks to be freed")


OPENAI_STATUSES = {"validating", "in_progress", "finalizing", "completed", "failed", "expired",
                   "cancelling", "cancelled"}


def test_a_batch_past_its_completion_window_expires(client: openai.OpenAI, helix: HelixClient,
                                                    daemon: ThreadDaemon) -> None:
    """A batch still running when its (Helix-only, short) window ends is ``expired``: the quick
    line done in time keeps its answer in the output file (the Redis client's text), the invalid
    line its 400, and the running, queued and never-enqueued long lines are cancelled (KV blocks
    freed) and answered ``batch_expired``; clients only ever see OpenAI's statuses. While it runs
    its input file cannot be deleted (409); unparsable windows are a 400."""
    for window in ("1 day", "25h", "0s", "24"):
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            client.batches.create(input_file_id="file-x", endpoint="/v1/completions",
                                  completion_window=window)
    # window 2: long-2 is never enqueued; 4,000 tokens take this daemon well over 3 s (it
    # makes a few hundred a second on CI's CPUs), so no long line ends in time
    longs = [f"long-{i}" for i in range(3)]
    lines = [_line("quick", "Once", max_tokens=2), _line("bad", "x", logprobs=2),
             *(_line(cid, "Hello", max_tokens=4000, ignore_eos=True) for cid in longs)]
    batch = _run(client, lines, window="3s")
    assert batch.expires_at == batch.created_at + 3
    with pytest.raises(openai.ConflictError):
        client.files.delete(batch.input_file_id)
    done, statuses = _wait(client, batch.id)
    assert set(statuses) <= OPENAI_STATUSES and statuses[-1] == "expired"
    assert done.expired_at is not None and done.expired_at >= batch.expires_at
    assert done.request_counts.model_dump() == {"total": 5, "completed": 1, "failed": 4}
    [quick] = _answers(client, done.output_file_id)
    direct = helix.result(helix.submit("Once", max_tokens=2, temperature=0), timeout_s=60)
    assert quick["custom_id"] == "quick"
    assert quick["response"]["body"]["choices"][0]["text"] == direct.text
    errors = {a["custom_id"]: a for a in _answers(client, done.error_file_id)}
    assert sorted(errors) == sorted(["bad", *longs])
    assert errors["bad"]["response"]["status_code"] == 400
    for custom_id in longs:
        assert errors[custom_id]["response"] is None
        assert errors[custom_id]["error"]["code"] == "batch_expired"
    wait_until(lambda: daemon.kv_blocks_used() == 0, 30, "the KV blocks to be freed")


def test_files_are_listed_paged_and_deleted(client: openai.OpenAI) -> None:
    """``files.list``: OpenAI's page, newest first (or ``order="asc"``), only the asked
    ``purpose``, paged by ``limit`` and ``after`` (the SDK's auto-paging yields each file once);
    ``files.delete``: OpenAI's deleted object, the file gone from the list and from retrieve;
    an unknown file is a 404."""
    made = [client.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch").id
            for i in range(3)]
    newest_first = [f.id for f in client.files.list(purpose="batch")]
    assert [i for i in newest_first if i in made] == made[::-1]
    assert all(f.purpose == "batch" for f in client.files.list(purpose="batch"))
    assert not set(made) & {f.id for f in client.files.list(purpose="batch_output")}
    first = client.files.list(purpose="batch", limit=2)
    assert first.data[0].id == newest_first[0] and len(first.data) == 2 and first.has_more
    assert [f.id for f in first] == newest_first  # auto-paging: after=<last id>, 2 at a time
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == newest_first[::-1]
    deleted = client.files.delete(made[1])
    assert (deleted.id, deleted.deleted, deleted.object) == (made[1], True, "file")
    assert made[1] not in [f.id for f in client.files.list()]
    for call in (client.files.retrieve, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(made[1])


def _gateway_process(redis_url: str, prefix: str, port: int, log: Path) -> subprocess.Popen:
    code = ("import sys; from helix_daemon.cli.main import main; "
            f"sys.exit(main(['gateway', '--redis-url', {redis_url!r}, '--prefix', {prefix!r}, "
            f"'--port', '{port}']))")
    return subprocess.Popen([sys.executable, "-c", code], env=base_env(), cwd=REPO,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def test_a_batch_survives_its_gateway_killed_with_sigkill(tiny_model_path: Path,
                                                          redis_url: str, key_prefix: str,
                                                          tmp_path: Path,
                                                          sync_redis: redis.Redis) -> None:
    """The only gateway of a prefix, a real process, takes a batch in progress and is killed
    with SIGKILL; a second replica, started afterwards, takes the lapsed lease and completes the
    batch: every custom_id answered exactly once, all of them successfully. A second batch of
    the dead gateway, whose short window ends meanwhile, is expired by the new replica."""
    # a prefix of its own (key_prefix): no other replica can take the batch
    own_daemon = start_thread_daemon(str(tiny_model_path), redis_url, key_prefix)
    port = free_port()
    first = _gateway_process(redis_url, key_prefix, port, tmp_path / "gateway.log")
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=3) as c:
            wait_until(lambda: _answers_health(port), 60, "the gateway process")
            lines = [_line(f"k-{i}", f"Prompt {i}", max_tokens=400, ignore_eos=True)
                     for i in range(12)]
            batch = _run(c, lines)
            wait_until(lambda: c.batches.retrieve(batch.id).status == "in_progress", 60,
                       "the first gateway to start the batch")
            late_lines = [_line(f"late-{i}", "Hello", max_tokens=4000, ignore_eos=True)
                          for i in range(3)]
            late = _run(c, late_lines, window="6s")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL
        # killed mid-batch, holding the lease: nobody has finished its bookkeeping
        assert sync_redis.hget(f"{key_prefix}:b:{{{batch.id}}}", "status") == b"in_progress"
        assert sync_redis.exists(f"{key_prefix}:b:{{{batch.id}}}:lease")
        assert sync_redis.hget(f"{key_prefix}:b:{{{late.id}}}", "status") in (b"validating",
                                                                            b"in_progress")
        second = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=key_prefix)).start()
        try:
            with openai.OpenAI(base_url=second.base_url, api_key="x", max_retries=0) as c:
                done, _ = _wait(c, batch.id)
                answered = _answers(c, done.output_file_id) + _answers(c, done.error_file_id)
                late_done, _ = _wait(c, late.id)
                late_answered = _answers(c, late_done.error_file_id)
        finally:
            second.stop()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        own_daemon.stop()
    assert done.status == "completed"
    assert sorted(a["custom_id"] for a in answered) == sorted(line["custom_id"]
                                                              for line in lines)
    assert len(answered) == len(lines) and done.error_file_id is None
    assert done.request_counts.completed == len(lines)
    assert late_done.status == "expired" and late_done.output_file_id is None
    assert sorted(a["custom_id"] for a in late_answered) == [f"late-{i}" for i in range(3)]
    assert {a["error"]["code"] for a in late_answered} == {"batch_expired"}


def _answers_health(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False



def test_helix_batch_reads_and_writes_openai_batch_lines(daemon: ThreadDaemon, redis_url: str,
                                                         module_prefix: str, tmp_path: Path,
                                                         helix: HelixClient) -> None:
    """``helix batch`` runs a file of OpenAI batch lines (chat and completions) and writes
    OpenAI's output lines: every custom_id once, texts equal to the Redis client's, the invalid
    line answered with a 400 body (exit code 1); a rerun skips every line already written."""
    from helix_daemon.cli.main import main

    chat = [{"role": "user", "content": "Hi"}]
    lines = [_line("c-1", "Once upon"), _line("c-2", "Hello"), _line("bad", "x", n=2),
             {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "ignored", "messages": chat, "max_tokens": 4}}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(_jsonl(lines))
    argv = ["batch", str(src), str(dst), "--redis-url", redis_url, "--prefix", module_prefix,
            "--no-progress"]
    assert main(argv) == 1
    written = [json.loads(line) for line in dst.read_text().splitlines()]
    by_id = {a["custom_id"]: a for a in written}
    assert sorted(by_id) == ["bad", "c-1", "c-2", "chat-1"] and len(written) == 4
    for custom_id, prompt in (("c-1", "Once upon"), ("c-2", "Hello")):
        direct = helix.result(helix.submit(prompt, max_tokens=8, temperature=0), timeout_s=60)
        response = by_id[custom_id]["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["text"] == direct.text
    assert by_id["bad"]["response"]["status_code"] == 400
    # the tiny model has no chat template: the daemon's invalid_request, as OpenAI's 400
    assert by_id["chat-1"]["response"]["status_code"] == 400
    assert "chat template" in by_id["chat-1"]["response"]["body"]["error"]["message"]
    assert main(argv) == 0  # nothing left to run
    assert len(dst.read_text().splitlines()) == 4
