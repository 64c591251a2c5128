"""Daemons as real processes: kill -9, SIGSTOP/SIGCONT, SIGTERM, a Redis restart, a restart
under the same name. Every job must finish with a gap-free stream whose greedy output equals an
uninterrupted in-process run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from helix_daemon.wire import protocol as p
from tests.daemon_harness import (
    DaemonProcess,
    ForkedDaemon,
    Zygote,
    base_env,
    check_stream,
    daemon_env,
    engine_process_of,
    enqueue,
    greedy_reference,
    pid_alive,
    read_result,
    wait_all_finished,
    wait_until,
)

pytestmark = pytest.mark.process  # `make test-fast` leaves these out

QUEUE = "pq"
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time"]


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """One pre-imported Python that forks every daemon of these tests (fast, real processes)."""
    z = Zygote(base_env())
    yield z
    z.close()


@pytest.fixture
def spawn(zygote: Zygote, tiny_model_path: Path, redis_url: str, key_prefix: str,
          tmp_path: Path) -> Iterator[Callable[..., ForkedDaemon]]:
    """Start daemon processes on this test's prefix; any still alive are killed at teardown."""
    procs: list[ForkedDaemon] = []

    def start(daemon_id: str, url: str = redis_url, model: str = str(tiny_model_path),
              **settings: object) -> ForkedDaemon:
        env = daemon_env(url, key_prefix, QUEUE, model, daemon_id, **settings)
        proc = zygote.spawn(env, tmp_path / f"{daemon_id}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.signal(signal.SIGCONT)
            proc.kill()


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> Callable[[int], list[tuple[list[int], str]]]:
    """Uninterrupted greedy outputs of PROMPTS, cached per max_tokens."""
    cache: dict[int, list[tuple[list[int], str]]] = {}

    def get(max_tokens: int) -> list[tuple[list[int], str]]:
        if max_tokens not in cache:
            cache[max_tokens] = greedy_reference(str(tiny_model_path), PROMPTS, max_tokens)
        return cache[max_tokens]

    return get


def submit(client: redis.Redis, prefix: str, max_tokens: int, tag: str) -> list[str]:
    ids = [f"{tag}{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS):
        enqueue(client, prefix, QUEUE, {"prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True}, rid)
    return ids


def assert_matches_reference(client: redis.Redis, prefix: str, ids: list[str],
                             expected: list[tuple[list[int], str]]) -> set[int]:
    """Every stream is valid and equals the uninterrupted run; returns the attempts seen."""
    attempts: set[int] = set()
    for rid, (ref_ids, ref_text) in zip(ids, expected):
        result = read_result(client, prefix, rid)
        assert isinstance(result.terminal, p.DoneEvent), (rid, result.terminal)
        assert result.ids == ref_ids, f"{rid}: token ids differ from the uninterrupted run"
        assert result.text == ref_text, f"{rid}: text differs from the uninterrupted run"
        attempts |= result.attempts_seen
    return attempts


def meta(client: redis.Redis, prefix: str, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(p.meta_key(rid, prefix)).items()}


def streaming_under(client: redis.Redis, prefix: str, rid: str, owner: str) -> bool:
    """``owner`` holds the request and its current attempt has written at least one token."""
    m = meta(client, prefix, rid)
    if m.get("state") != "running" or m.get("owner") != owner:
        return m.get("state") == "done"
    last = client.xrevrange(p.out_key(rid, prefix), count=1)
    return bool(last) and last[0][1].get(b"att") == m["epoch"].encode()


class Follower(threading.Thread):
    """A reader doing XREAD BLOCK on every stream, the way clients read, recording what it saw."""

    def __init__(self, redis_url: str, prefix: str, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.cursors = {p.out_key(r, prefix): "0" for r in ids}
        self.seen: dict[str, list[p.Event]] = {k: [] for k in self.cursors}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.cursors:
            try:
                reply = self.client.xread(self.cursors, block=200)
            except redis.ConnectionError:
                time.sleep(0.1)
                continue
            for key, entries in reply or []:
                key = key.decode()
                for entry_id, fields in entries:
                    self.cursors[key] = entry_id.decode()
                    self.seen[key].append(p.decode_event(fields))
                if self.seen[key] and p.is_terminal(self.seen[key][-1]):
                    del self.cursors[key]


def streaming_now(client: redis.Redis, prefix: str, rid: str, live: dict[str, object]) -> bool:
    """A live daemon owns the request and its attempt has written at least one token."""
    m = meta(client, prefix, rid)
    if m.get("state") != "running" or m.get("owner") not in live:
        return m.get("state") == "done"
    last = client.xrevrange(p.out_key(rid, prefix), count=1)
    return bool(last) and last[0][1].get(b"att") == m["epoch"].encode()


@pytest.mark.slow
def test_kill_9_mid_stream_twenty_times(spawn, sync_redis, key_prefix, redis_url,
                                        reference) -> None:
    """SIGKILL whichever daemon is streaming, 20 times, with a spare always running: a spare
    resumes every job each time. Readers see every offset exactly once and the final output
    equals an uninterrupted run."""
    max_tokens = 800
    ids = submit(sync_redis, key_prefix, max_tokens, "k")
    follower = Follower(redis_url, key_prefix, ids)
    follower.start()
    settings = {"max_attempts": 100}
    names = itertools.count(2)
    live = {name: spawn(name, **settings) for name in ("k0", "k1")}
    kills = 0
    while kills < 20:
        wait_until(lambda: all(streaming_now(sync_redis, key_prefix, r, live) for r in ids),
                   60, "every job to stream under a live owner")
        owners = {meta(sync_redis, key_prefix, r)["owner"] for r in ids
                  if meta(sync_redis, key_prefix, r)["state"] == "running"}
        if not owners:
            break
        for owner in owners:
            live.pop(owner).kill()
            name = f"k{next(names)}"
            live[name] = spawn(name, **settings)
        kills += 1
    wait_all_finished(sync_redis, key_prefix, ids, 120)
    follower.join(10)
    assert kills == 20, f"jobs finished after only {kills} kills; raise max_tokens"
    attempts = assert_matches_reference(sync_redis, key_prefix, ids, reference(max_tokens))
    assert len(attempts) >= 21
    for rid in ids:
        seen = follower.seen[p.out_key(rid, key_prefix)]
        assert [e.seq for e in seen] == list(range(len(seen)))
        assert check_stream(seen).ids == reference(max_tokens)[ids.index(rid)][0]


@pytest.mark.parametrize("engine_process", ["false", "true"])
def test_sigstopped_daemon_is_fenced_after_takeover(spawn, sync_redis, key_prefix, reference,
                                                    engine_process) -> None:
    """A daemon paused past its lease loses the job; after SIGCONT its late writes are refused
    (it drops the sequence) and the stream stays exactly the uninterrupted run. With an engine
    process, that process is not paused: it runs on until its results back up."""
    max_tokens = 600
    ids = submit(sync_redis, key_prefix, max_tokens, "s")
    paused = spawn("s0", engine_process=engine_process)
    wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "s0") for r in ids), 60,
               "s0 streaming")
    # pause first, then start the taker: s0 cannot finish the jobs while s1 is starting
    paused.signal(signal.SIGSTOP)
    taker = spawn("s1")
    wait_until(lambda: all(meta(sync_redis, key_prefix, r).get("owner") == "s1"
                           or meta(sync_redis, key_prefix, r).get("state") == "done"
                           for r in ids), 30, "s1 to take over")
    paused.signal(signal.SIGCONT)
    wait_all_finished(sync_redis, key_prefix, ids, 120)
    attempts = assert_matches_reference(sync_redis, key_prefix, ids, reference(max_tokens))
    assert attempts == {1, 2}
    wait_until(lambda: "write refused" in paused.log_text(), 10, "s0 to see its writes refused")
    beat = sync_redis.get(p.daemon_key("s0", key_prefix))
    wait_until(lambda: json.loads(sync_redis.get(p.daemon_key("s0", key_prefix)) or beat)
               ["kv_blocks_used"] == 0, 10, "s0 to free its KV blocks")
    assert taker.is_alive()


def test_sigterm_drains_then_exits_zero(sync_redis, key_prefix, redis_url, tiny_model_path,
                                       tmp_path, reference) -> None:
    """``python -m helix_daemon.daemon`` with its default engine process, under a SIGTERM sent
    to its whole process group (as systemd stops a service), lets running jobs finish (drain)
    and exits 0 with its engine process; nothing is left pending and its heartbeat is gone.
    The daemon itself never loads torch: only its engine process does."""
    ids = submit(sync_redis, key_prefix, 300, "t")
    env = daemon_env(redis_url, key_prefix, QUEUE, str(tiny_model_path), "t0",
                     drain_timeout_s=60)
    del env["HELIX_ENGINE_PROCESS"]  # the product's default
    daemon = DaemonProcess(env, tmp_path / "t0.log")
    try:
        wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "t0") for r in ids),
                   60, "t0 streaming")
        engine = engine_process_of(daemon.pid)
        assert b"libtorch" in Path(f"/proc/{engine}/maps").read_bytes()
        assert b"libtorch" not in Path(f"/proc/{daemon.pid}/maps").read_bytes()
        daemon.signal_group(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.close()  # its engine process follows it
    assert not pid_alive(engine)
    assert assert_matches_reference(sync_redis, key_prefix, ids, reference(300)) == {1}
    assert sync_redis.xpending(p.queue_key(QUEUE, key_prefix), p.GROUP)["pending"] == 0
    assert not sync_redis.exists(p.daemon_key("t0", key_prefix))


def test_engine_that_cannot_load_ends_the_daemon_with_its_reason(spawn, tmp_path) -> None:
    """A model folder that is not there: the engine process reports the loader's error, and the
    daemon logs it and exits 1 instead of serving nothing."""
    daemon = spawn("n0", model=str(tmp_path / "no-such-model"), engine_process="true")
    assert daemon.wait(60) == 1
    log = daemon.log_text()
    assert "engine failed to start" in log and "no-such-model" in log, log[-2000:]


def test_engine_process_exits_with_its_killed_daemon(spawn, sync_redis, key_prefix,
                                                     reference) -> None:
    """kill -9 of a daemon whose engine runs in its own process, idle and then mid-stream: the
    orphaned engine process notices and exits by itself (freeing its memory), and another
    daemon resumes every job exactly."""
    idle = spawn("e0", engine_process="true")
    wait_until(lambda: sync_redis.exists(p.daemon_key("e0", key_prefix)), 60, "e0 up")
    engine = engine_process_of(idle.pid)
    idle.kill()  # an idle engine is waiting for commands, not writing results
    wait_until(lambda: not pid_alive(engine), 10, "the idle orphaned engine process to exit")

    ids = submit(sync_redis, key_prefix, 600, "e")
    busy = spawn("e1", engine_process="true")
    wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "e1") for r in ids), 60,
               "e1 streaming")
    engine = engine_process_of(busy.pid)
    busy.kill()
    wait_until(lambda: not pid_alive(engine), 10, "the busy orphaned engine process to exit")
    spawn("e2")
    wait_all_finished(sync_redis, key_prefix, ids, 60)
    assert assert_matches_reference(sync_redis, key_prefix, ids, reference(600)) == {1, 2}


def test_daemon_exits_when_its_engine_process_dies(spawn, sync_redis, key_prefix,
                                                   reference) -> None:
    """kill -9 of the engine process mid-stream: the daemon says so and exits 1 (for its
    supervisor to restart it) instead of hanging, and another daemon resumes every job."""
    ids = submit(sync_redis, key_prefix, 600, "d")
    first = spawn("d0", engine_process="true")
    wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "d0") for r in ids), 60,
               "d0 streaming")
    os.kill(engine_process_of(first.pid), signal.SIGKILL)
    assert first.wait(30) == 1
    assert "engine process died" in first.log_text()
    spawn("d1")
    wait_all_finished(sync_redis, key_prefix, ids, 60)
    assert assert_matches_reference(sync_redis, key_prefix, ids, reference(600)) == {1, 2}


def test_sigterm_hands_unfinished_jobs_back_at_once(spawn, sync_redis, key_prefix,
                                                    reference) -> None:
    """Past drain_timeout_s the leftover jobs are released: another daemon takes them long
    before their (60 s) lease would lapse, and resumes them exactly."""
    ids = submit(sync_redis, key_prefix, 900, "h")
    leaving = spawn("h0", drain_timeout_s=0.5, lease_ms=60_000)
    wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "h0") for r in ids), 60,
               "h0 streaming")
    staying = spawn("h1", lease_ms=60_000)
    # SIGTERM as soon as h1 is up (its heartbeat), while h0 is still far from done.
    wait_until(lambda: sync_redis.exists(p.daemon_key("h1", key_prefix)), 30, "h1 up")
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(30) == 0
    wait_all_finished(sync_redis, key_prefix, ids, 45)
    assert assert_matches_reference(sync_redis, key_prefix, ids, reference(900)) == {1, 2}
    assert staying.is_alive()


def test_restart_under_the_same_name_resumes_at_once(spawn, sync_redis, key_prefix,
                                                     reference) -> None:
    """kill -9 then restart with the same daemon id: its pending entries come back without
    waiting for the (60 s) lease, and the output is still exact."""
    ids = submit(sync_redis, key_prefix, 600, "r")
    first = spawn("same", lease_ms=60_000)
    wait_until(lambda: all(streaming_under(sync_redis, key_prefix, r, "same") for r in ids), 60,
               "first life streaming")
    first.kill()
    spawn("same", lease_ms=60_000)
    wait_all_finished(sync_redis, key_prefix, ids, 45)
    assert assert_matches_reference(sync_redis, key_prefix, ids, reference(600)) == {1, 2}


def test_redis_restart_mid_run_loses_nothing(spawn, private_redis, key_prefix, reference) -> None:
    """Redis (AOF, own server) restarted while jobs stream: the daemon reconnects, retries its
    unsent writes, and every job finishes exactly as an uninterrupted run."""
    server = private_redis()
    client = redis.Redis.from_url(server.url)
    ids = submit(client, key_prefix, 600, "x")
    spawn("x0", url=server.url)
    wait_until(lambda: all(streaming_under(client, key_prefix, r, "x0") for r in ids), 60,
               "x0 streaming")
    server.stop()
    time.sleep(1.0)
    server.start()
    wait_all_finished(client, key_prefix, ids, 90)
    assert_matches_reference(client, key_prefix, ids, reference(600))
    client.close()


_EMBEDDED_THEN_CANCELLED = """
import asyncio, sys
from helix_daemon.config import DaemonConfig
from helix_daemon.server.daemon import Daemon
from helix_daemon.server.run import redis_client

async def main():
    model, url, prefix = sys.argv[1:4]
    config = DaemonConfig(model=model, redis_url=url, key_prefix=prefix, queue="pq",
                          daemon_id="c0", device="cpu", num_kv_blocks=64)
    daemon = Daemon(config, None, redis_client(url))
    task = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    print("engine", daemon._handle._process.pid, flush=True)
    task.cancel()  # as Ctrl-C in an embedding program would

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_cancelled_daemon_leaves_no_engine_and_its_program_exits(
        tiny_model_path, redis_url, key_prefix, tmp_path) -> None:
    """A program that embeds a daemon and cancels it (no graceful stop) still exits, and its
    engine process (which ignores SIGTERM, so multiprocessing's exit handler alone would wait
    on it forever) is gone."""
    script = tmp_path / "embedded.py"
    script.write_text(_EMBEDDED_THEN_CANCELLED)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_path), redis_url,
                           key_prefix], env=base_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine = int(next(line for line in proc.stdout.splitlines()
                      if line.startswith("engine")).split()[1])
    wait_until(lambda: not pid_alive(engine), 10, "the engine process to be gone")
