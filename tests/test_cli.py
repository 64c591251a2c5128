"""The ``helix`` command line against a real daemon (tiny model) and the shared Redis."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from helix_daemon.cli.batch import finished_ids, read_batch
from helix_daemon.cli.demo import percentile
from helix_daemon.cli.main import build_parser, main, parse_memory
from helix_daemon.cli.serve import daemon_config
from helix_daemon.client import HelixClient
from helix_daemon.wire.protocol import meta_key, out_key
from tests.conftest import SHARED_REDIS_URL
from tests.daemon_harness import ThreadDaemon, start_thread_daemon
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def prefix(module_prefix: str) -> str:
    return module_prefix


@pytest.fixture(scope="module")
def daemon(prefix: str, redis_url: str) -> Iterator[ThreadDaemon]:
    live = start_thread_daemon(tiny_model(), redis_url, prefix)
    yield live
    assert live.stop() == 0


def _cli(prefix: str, *argv: str) -> int:
    return main([argv[0], "--redis-url", SHARED_REDIS_URL, "--prefix", prefix, *argv[1:]])


def test_parse_memory_accepts_sizes_and_fractions() -> None:
    """--kv-cache-memory takes binary/decimal sizes or a fraction, normalised for DaemonConfig."""
    assert parse_memory("2GiB") == str(2 * 2**30)
    assert parse_memory("512mb") == str(512 * 10**6)
    assert parse_memory("0.5") == "0.5"
    assert parse_memory("auto") == "auto"
    for bad in ("lots", "2 parsecs", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_memory(bad)


def test_serve_flags_override_helix_variables_only_when_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HELIX_* variables configure `helix serve` (as docker-compose relies on); a flag that is
    given wins over its variable, and one that is not leaves the variable in force."""
    for name, value in {"HELIX_MODEL": "/models/env", "HELIX_DRAFT": "ngram",
                        "HELIX_QUEUE": "envq", "HELIX_METRICS_PORT": "9400",
                        "HELIX_KEY_PREFIX": "envp"}.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve", "--draft", "none", "--queue", "flagq"])
    config = daemon_config(args, args.redis_url)
    assert (config.model, config.draft, config.queue) == ("/models/env", "none", "flagq")
    assert (config.metrics_port, config.key_prefix) == (9400, "envp")
    monkeypatch.delenv("HELIX_MODEL")
    with pytest.raises(SystemExit, match="--model"):
        daemon_config(build_parser().parse_args(["serve"]), args.redis_url)


def test_batch_ids_are_deterministic(tmp_path: Path) -> None:
    """Line ids are uuid5(file content, line): stable across reads, changed by any edit; an
    explicit "id" wins; a broken line becomes an invalid item instead of aborting the batch."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"id": "mine", "prompt": "b"}\nnot json\n')
    first, again = read_batch(path), read_batch(path)
    assert [i.request_id for i in first] == [i.request_id for i in again]
    assert first[1].request_id == "mine" and "id" not in first[1].body
    assert first[2].invalid is not None and first[2].line == 4
    path.write_text('{"prompt": "a"}\n\n{"id": "mine", "prompt": "b"}\nnot json!\n')
    assert read_batch(path)[0].request_id != first[0].request_id
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) == 0.0


def test_batch_rerun_skips_finished_ids(daemon: ThreadDaemon, prefix: str, tmp_path: Path,
                                        capsys) -> None:
    """A batch writes one JSONL result per line; re-running it enqueues nothing: ids in the
    output file are skipped, and ids finished in Redis but missing from the output are copied
    from their stored result (same entry, same text) instead of being generated again."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"prompt": f"line {i}", "max_tokens": 4 + i, "temperature": 0} for i in range(5)]
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert _cli(prefix, "batch", str(src), str(dst), "--concurrency", "3", "--no-progress") == 0
    results = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(results) == 5 and all(r["state"] == "done" for r in results)
    assert {r["line"]: r["usage"]["completion_tokens"] for r in results} == \
        {i + 1: 4 + i for i in range(5)}
    client = HelixClient.from_url(SHARED_REDIS_URL, prefix=prefix)
    entries = {r["id"]: client.meta(r["id"])["entry_id"] for r in results}

    assert _cli(prefix, "batch", str(src), str(dst), "--no-progress") == 0
    assert len(dst.read_text().splitlines()) == 5
    assert "5 already in" in capsys.readouterr().err

    kept = dst.read_text().splitlines()[:3]
    dst.write_text("\n".join(kept) + "\n")  # lose two results, as after a crash
    assert _cli(prefix, "batch", str(src), str(dst), "--no-progress") == 0
    rerun = [json.loads(line) for line in dst.read_text().splitlines()]
    assert sorted(r["id"] for r in rerun) == sorted(entries)
    assert "2 reused from Redis" in capsys.readouterr().err
    for r in rerun:
        assert client.meta(r["id"])["entry_id"] == entries[r["id"]]  # never enqueued again
    assert finished_ids(dst) == set(entries)
    client.close()


def test_status_lists_daemon_and_queue(daemon: ThreadDaemon, prefix: str, capsys) -> None:
    """`helix status` shows the queue line and the live daemon with its model and KV blocks;
    --json carries the heartbeat fields."""
    assert _cli(prefix, "status") == 0
    text = capsys.readouterr().out
    assert "queue default:" in text and "pending" in text
    row = next(line for line in text.splitlines() if line.startswith(daemon.config.daemon_id))
    assert "alive" in row and "/256)" in row
    assert _cli(prefix, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    (daemon_id, _seen, beat), = status["daemons"]
    assert daemon_id == daemon.config.daemon_id and beat["kv_blocks_total"] == 256


def test_submit_stream_and_resume(daemon: ThreadDaemon, prefix: str, capsys) -> None:
    """`submit --stream` prints the id then the text as it streams (equal to the stored result);
    `stream --json --from-seq 1` replays the events from seq 1 on, ending with `done`."""
    code = _cli(prefix, "submit", "Hello there", "--max-tokens", "6", "--temperature", "0",
                "--ignore-eos", "--stream")
    out = capsys.readouterr().out
    assert code == 0
    rid, text = out.split("\n", 1)
    client = HelixClient.from_url(SHARED_REDIS_URL, prefix=prefix)
    result = client.result(rid, timeout_s=10)
    client.close()
    assert result.ok and len(result.token_ids) == 6
    assert text == result.text + "\n"  # the deltas concatenate to the stored text
    assert _cli(prefix, "stream", rid, "--json", "--from-seq", "1") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["seq"] == 1 and events[-1]["type"] == "done"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_cancel_stops_a_running_request(daemon: ThreadDaemon, prefix: str, capsys) -> None:
    """`helix cancel` on a long request ends it with a `cancelled` event well before
    max_tokens, and the meta hash records the cancel."""
    client = HelixClient.from_url(SHARED_REDIS_URL, prefix=prefix)
    rid = client.submit("Go on", max_tokens=900, ignore_eos=True, temperature=0)
    next(iter(client.stream(rid, timeout_s=30)))  # running: the first tokens arrived
    assert _cli(prefix, "cancel", rid) == 0
    assert "cancel requested" in capsys.readouterr().out
    result = client.result(rid, timeout_s=30)
    assert result.state == "cancelled" and len(result.token_ids) < 900
    assert client.meta(rid)["state"] == "cancelled"
    r = redis.Redis.from_url(SHARED_REDIS_URL)
    assert r.ttl(meta_key(rid, prefix)) > 0 and r.ttl(out_key(rid, prefix)) > 0
    r.close()
    client.close()


def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    """`helix demo --tiny` builds tiny models, runs its own daemon, streams two requests, runs a
    small batch and prints a summary, then cleans its keys and exits 0."""
    code = main(["demo", "--tiny", "--num-requests", "6", "--max-tokens", "8", "--concurrency",
                 "3",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--draft", "ngram"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "demo summary" in out and "6 (6 done, 0 failed)" in out
    assert "TTFT p50 / p99" in out and "KV cache use" in out
    prefix = out.split("key prefix ")[1].split(")")[0]
    r = redis.Redis.from_url(SHARED_REDIS_URL)
    assert not list(r.scan_iter(match=f"{prefix}:*"))
    r.close()


@pytest.mark.process
def test_serve_with_embedded_redis_and_sigterm(tmp_path: Path) -> None:
    """`helix serve --redis-url embedded` starts a private Redis, serves requests from it, and
    on SIGTERM drains, exits 0 and stops that Redis."""
    import signal
    import subprocess
    import sys
    import time

    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "helix_daemon", "serve", "--model", tiny_model(),
             "--device", "cpu", "--redis-url", "embedded", "--daemon-id", "serve-test",
             "--kv-cache-memory", "4MiB"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "Redis at " not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        url = log_path.read_text().split("Redis at ")[1].split()[0]
        with HelixClient.from_url(url) as client:
            rid = client.submit("Hello", max_tokens=4, temperature=0)
            assert client.result(rid, timeout_s=60).ok
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
