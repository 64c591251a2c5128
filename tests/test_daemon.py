"""The daemon end to end with a real tiny model and the real shared Redis (daemon in a thread).

Producers and readers use raw Redis commands, exactly as docs/protocol.md documents them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helix_daemon.config import DaemonConfig
from helix_daemon.engine_host.load import load_engine
from helix_daemon.wire import protocol as p
from tests.daemon_harness import (
    ThreadDaemon,
    enqueue,
    greedy_reference,
    one_torch_thread,
    read_result,
    wait_all_finished,
    wait_until,
)

QUEUE = "q"
PROMPTS = ["Hello there", "The quick brown fox", "abc", "Once upon a time", "42 is",
           "Redis streams", "paged attention", "zzz", "a b c d e f", "Helix"]


@pytest.fixture
def start_daemon(tiny_model_path: Path, redis_url: str,
                 key_prefix: str) -> Iterator[Callable[..., ThreadDaemon]]:
    """Start in-thread daemons on a per-test prefix; all stopped (like SIGTERM) at teardown."""
    started: list[ThreadDaemon] = []

    def start(**overrides: object) -> ThreadDaemon:
        config = DaemonConfig(model=str(tiny_model_path), redis_url=redis_url,
                              key_prefix=key_prefix, queue=QUEUE, daemon_id=f"t{len(started)}",
                              device="cpu", dtype="float64", num_kv_blocks=256, lease_ms=1500,
                              reclaim_interval_s=0.2, heartbeat_interval_s=0.5,
                              drain_timeout_s=5, log_json=True)
        config = dataclasses.replace(config, **overrides)
        daemon = ThreadDaemon(config, load_engine(config.engine_config())).start()
        started.append(daemon)
        return daemon

    with one_torch_thread():
        yield start
        for daemon in started:
            daemon.stop()


def queue_is_empty(client: redis.Redis, prefix: str) -> bool:
    key = p.queue_key(QUEUE, prefix)
    return client.xlen(key) == 0 and client.xpending(key, p.GROUP)["pending"] == 0


def test_documented_raw_xadd_is_answered(start_daemon, sync_redis, key_prefix) -> None:
    """The docs' redis-cli XADD gets a gap-free stream ending in done; meta settles; entry acked."""
    start_daemon()
    sync_redis.execute_command(
        "XADD", p.queue_key(QUEUE, key_prefix), "*", "v", "1", "id", "r1", "body",
        '{"prompt":"Hello","max_tokens":8,"temperature":0}')
    wait_all_finished(sync_redis, key_prefix, ["r1"], 60)
    result = read_result(sync_redis, key_prefix, "r1")
    assert isinstance(result.terminal, p.DoneEvent)
    assert result.terminal.finish_reason in ("stop", "length")
    assert result.terminal.usage.completion_tokens == len(result.ids) <= 8
    assert result.terminal.timings.attempts == 1
    meta = sync_redis.hgetall(p.meta_key("r1", key_prefix))
    assert meta[b"state"] == b"done" and meta[b"owner"] == b"t0"
    assert 0 < sync_redis.ttl(p.out_key("r1", key_prefix)) <= 3600
    wait_until(lambda: queue_is_empty(sync_redis, key_prefix), 10, "the entry to be acked")


def test_fifty_jobs_from_several_producers(start_daemon, sync_redis, key_prefix, redis_url,
                                           tiny_model_path) -> None:
    """50 jobs from 5 producer threads all finish gap-free with the in-process greedy output."""
    start_daemon(max_num_seqs=16)
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}

    def produce(worker: int) -> None:
        client = redis.Redis.from_url(redis_url)
        for i in range(10):
            n = worker * 10 + i
            enqueue(client, key_prefix, QUEUE, {**body, "prompt": PROMPTS[n % 10]}, f"j{n}")
        client.close()

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(5)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    expected = greedy_reference(str(tiny_model_path), PROMPTS, 12)
    wait_all_finished(sync_redis, key_prefix, [f"j{n}" for n in range(50)], 180)
    for n in range(50):
        result = read_result(sync_redis, key_prefix, f"j{n}")
        assert isinstance(result.terminal, p.DoneEvent), result.terminal
        assert (result.ids, result.text) == expected[n % 10], f"job j{n}"
    wait_until(lambda: queue_is_empty(sync_redis, key_prefix), 10, "every entry acked")


MALFORMED: list[tuple[str, dict[str, bytes], str]] = [
    ("m-notjson", {"id": b"m-notjson", "body": b"{not json"}, "bad_entry"),
    ("m-types", {"id": b"m-types", "body": b'{"prompt": 7}'}, "bad_entry"),
    ("m-unknown", {"id": b"m-unknown", "body": b'{"prompt":"a","temp":0}'}, "bad_entry"),
    ("m-negative", {"id": b"m-negative", "body": b'{"prompt":"a","max_tokens":-1}'},
     "invalid_request"),
    ("m-both", {"id": b"m-both", "body": b'{"prompt":"a","prompt_token_ids":[1]}'},
     "invalid_request"),
    ("m-huge", {"id": b"m-huge", "body": json.dumps({"prompt": "x" * (2 << 20)}).encode()},
     "bad_entry"),
    ("m-long", {"id": b"m-long", "body": json.dumps({"prompt": "word " * 6000}).encode()},
     "invalid_request"),
    ("m-vocab", {"id": b"m-vocab", "body": b'{"prompt_token_ids":[1, 99999999]}'},
     "invalid_request"),
    ("m-nobody", {"id": b"m-nobody", "v": b"1"}, "bad_entry"),
    ("m-version", {"id": b"m-version", "v": b"9", "body": b'{"prompt":"a"}'}, "bad_entry"),
    ("m-garbage", {"id": b"m-garbage", "body": b"\xff\xfe\x00\x81"}, "bad_entry"),
]


def test_malformed_entries_get_errors_or_dead_letters(start_daemon, sync_redis,
                                                      key_prefix) -> None:
    """Each malformed entry gets an error event (and bad ones a dead letter); unreadable ids go
    to the dead-letter stream only; the daemon keeps serving good requests afterwards."""
    start_daemon()
    queue = p.queue_key(QUEUE, key_prefix)
    for _, fields, _ in MALFORMED:
        sync_redis.xadd(queue, fields)
    no_id = [sync_redis.xadd(queue, {"id": b"\xff\xfe", "body": b"{}"}).decode(),
             sync_redis.xadd(queue, {b"\x00\xff": b"\x80", "id": b"a{b}"}).decode()]
    missing_id = sync_redis.xadd(queue, {"body": b"[1,2"}).decode()  # entry id names it
    enqueue(sync_redis, key_prefix, QUEUE, {"prompt": "ok", "max_tokens": 3}, "good")
    names = [n for n, _, _ in MALFORMED] + [missing_id, "good"]
    wait_all_finished(sync_redis, key_prefix, names, 60)
    for name, _, code in MALFORMED:
        terminal = read_result(sync_redis, key_prefix, name).terminal
        assert isinstance(terminal, p.ErrorEvent) and terminal.code == code, (name, terminal)
    assert read_result(sync_redis, key_prefix, missing_id).terminal.code == "bad_entry"
    assert isinstance(read_result(sync_redis, key_prefix, "good").terminal, p.DoneEvent)
    dead = {f[b"entry_id"].decode(): f for _, f in
            sync_redis.xrange(p.dlq_key(QUEUE, key_prefix))}
    assert set(no_id) <= set(dead) and all(b"id" not in dead[e] for e in no_id)
    dead_ids = {f.get(b"id", b"").decode() for f in dead.values()}
    assert {n for n, _, c in MALFORMED if c == "bad_entry"} <= dead_ids
    wait_until(lambda: queue_is_empty(sync_redis, key_prefix), 10, "every entry acked")


@pytest.fixture
def one_daemon(start_daemon) -> ThreadDaemon:
    return start_daemon()


_field = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode))
_bodies = st.one_of(
    _field,
    st.dictionaries(st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "stop",
                                     "prompt_token_ids", "seed", "bogus", "timeout_s"]),
                    st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8),
                              st.lists(st.integers(-2, 600), max_size=4), st.none()),
                    max_size=4).map(lambda d: json.dumps(d).encode()))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entry=st.fixed_dictionaries({"body": _bodies},
                                   optional={"id": _field, "v": _field, "junk": _field}))
def test_generated_entries_never_stop_the_daemon(one_daemon, sync_redis, key_prefix,
                                                 entry: dict[str, bytes]) -> None:
    """Any entry (hypothesis-generated) is answered on its stream or dead-lettered, and acked."""
    queue = p.queue_key(QUEUE, key_prefix)
    entry_id = sync_redis.xadd(queue, entry).decode()
    wait_until(lambda: not sync_redis.xrange(queue, entry_id, entry_id), 30, "the ack")
    request_id = p.read_request_id(entry, entry_id)
    dead = [f for _, f in sync_redis.xrange(p.dlq_key(QUEUE, key_prefix))
            if f[b"entry_id"].decode() == entry_id]
    if request_id is None:
        assert dead, "an entry without a readable id must be dead-lettered"
    else:
        wait_until(lambda: sync_redis.exists(p.out_key(request_id, key_prefix)), 5, "a stream")
        assert p.is_terminal(read_result(sync_redis, key_prefix, request_id).terminal)


LONG = {"prompt": "tell me everything", "max_tokens": 3000, "temperature": 0,
        "ignore_eos": True}


def first_tokens_seen(client: redis.Redis, prefix: str, request_id: str) -> bool:
    return client.xlen(p.out_key(request_id, prefix)) >= 2


def test_cancel_mid_generation_frees_kv_blocks(start_daemon, sync_redis, key_prefix) -> None:
    """HSET cancel + PUBLISH stops a running request: cancelled event, KV blocks back, acked."""
    daemon = start_daemon()
    enqueue(sync_redis, key_prefix, QUEUE, LONG, "long")
    wait_until(lambda: first_tokens_seen(sync_redis, key_prefix, "long"), 60, "first tokens")
    assert daemon.kv_blocks_used() > 0
    sync_redis.hset(p.meta_key("long", key_prefix), "cancel", "1")
    sync_redis.publish(p.cancel_channel(key_prefix), "long")
    wait_all_finished(sync_redis, key_prefix, ["long"], 10)
    result = read_result(sync_redis, key_prefix, "long")
    assert isinstance(result.terminal, p.CancelledEvent) and len(result.ids) < 3000
    wait_until(lambda: daemon.kv_blocks_used() == 0, 10, "KV blocks to be freed")
    wait_until(lambda: queue_is_empty(sync_redis, key_prefix), 10, "the ack")


def test_requests_settled_before_they_run(start_daemon, sync_redis, key_prefix) -> None:
    """Cancelled while queued: never runs. Re-submitted id: answered once. timeout_s already
    past at pick-up: error timeout. result_ttl_s sets the result's TTL. The sequences started
    in the engine ahead of their claims (head starts) of the refused ones are aborted: the
    engine ends up empty with every KV block free."""
    sync_redis.hset(p.meta_key("early", key_prefix), "cancel", "1")
    small = {"prompt": "a", "max_tokens": 4}
    enqueue(sync_redis, key_prefix, QUEUE, LONG, "early")  # would run long if not aborted
    enqueue(sync_redis, key_prefix, QUEUE, {**small, "result_ttl_s": 100}, "twice")
    enqueue(sync_redis, key_prefix, QUEUE, small, "twice")
    enqueue(sync_redis, key_prefix, QUEUE, {**small, "timeout_s": 0.01}, "stale")
    time.sleep(0.05)
    daemon = start_daemon()
    wait_all_finished(sync_redis, key_prefix, ["early", "twice", "stale"], 60)
    early = read_result(sync_redis, key_prefix, "early")
    assert len(early.events) == 1 and isinstance(early.terminal, p.CancelledEvent)
    assert isinstance(read_result(sync_redis, key_prefix, "twice").terminal, p.DoneEvent)
    assert 0 < sync_redis.ttl(p.out_key("twice", key_prefix)) <= 100
    stale = read_result(sync_redis, key_prefix, "stale")
    assert len(stale.events) == 1 and stale.terminal.code == "timeout"
    wait_until(lambda: queue_is_empty(sync_redis, key_prefix), 10, "both entries acked")
    # Aborted at its claim, "early" leaves within a step; left running it would take seconds.
    wait_until(lambda: not daemon.engine.has_unfinished() and daemon.kv_blocks_used() == 0, 2,
               "the engine to drop the refused head starts")
    daemon.engine.check_integrity()


def test_request_finished_before_its_claim_returns_is_written(start_daemon, sync_redis,
                                                            key_prefix) -> None:
    """A short request can finish in the engine while its claim is still on its way (a head
    start): the claim's answer must then write what was held, though no engine step will
    follow to trigger a flush. Here the claim is held back until the engine has finished the
    request, so the race is forced every time; before the fix the request was never written."""
    daemon = start_daemon()
    wait_until(lambda: sync_redis.exists(p.daemon_key("t0", key_prefix)), 30, "t0 up")
    state = daemon.daemon
    claim_many = state.store.claim_many

    async def claim_after_the_engine_finished(*args: object, **kwargs: object) -> object:
        for _ in range(1000):  # the engine needs milliseconds; 10 s at most
            held = state._admission.head_starts._held.values()
            if any(out.finished for outputs, _ in held for out in outputs):
                break
            await asyncio.sleep(0.01)
        return await claim_many(*args, **kwargs)

    state.store.claim_many = claim_after_the_engine_finished
    enqueue(sync_redis, key_prefix, QUEUE, {"prompt": "Hello there", "max_tokens": 4}, "quick")
    wait_all_finished(sync_redis, key_prefix, ["quick"], 30)
    result = read_result(sync_redis, key_prefix, "quick")
    assert isinstance(result.terminal, p.DoneEvent) and len(result.ids) == 4


def test_timeout_and_poison(start_daemon, sync_redis, key_prefix) -> None:
    """timeout_s expiring mid-run gives error timeout; a job already tried max_attempts times
    is ended as poison and dead-lettered."""
    start_daemon(max_attempts=2)
    enqueue(sync_redis, key_prefix, QUEUE, {**LONG, "timeout_s": 1.0}, "slow")
    sync_redis.hset(p.meta_key("bad", key_prefix), mapping={"attempts": 2, "state": "queued"})
    enqueue(sync_redis, key_prefix, QUEUE, {"prompt": "a"}, "bad")
    wait_all_finished(sync_redis, key_prefix, ["slow", "bad"], 60)
    slow = read_result(sync_redis, key_prefix, "slow").terminal
    assert isinstance(slow, p.ErrorEvent) and slow.code == "timeout"
    bad = read_result(sync_redis, key_prefix, "bad").terminal
    assert isinstance(bad, p.ErrorEvent) and bad.code == "poison"
    reasons = [f[b"reason"] for _, f in sync_redis.xrange(p.dlq_key(QUEUE, key_prefix))]
    assert any(r.startswith(b"poison") for r in reasons)


@pytest.mark.parametrize("max_waiting", [0, 1])
def test_heartbeat_and_backpressure(start_daemon, sync_redis, key_prefix, max_waiting) -> None:
    """The daemon registers a heartbeat, and never holds more entries than max_num_seqs plus
    max_waiting (the rest stay in the queue for other daemons)."""
    start_daemon(max_num_seqs=2, max_waiting=max_waiting)
    for i in range(6):
        enqueue(sync_redis, key_prefix, QUEUE, {**LONG, "max_tokens": 200}, f"b{i}")
    wait_until(lambda: sync_redis.exists(p.daemon_key("t0", key_prefix)), 10, "a heartbeat")
    beat = json.loads(sync_redis.get(p.daemon_key("t0", key_prefix)))
    assert beat["daemon_id"] == "t0" and beat["queue"] == QUEUE and beat["kv_blocks_total"] == 256
    pending_max = 0
    queue = p.queue_key(QUEUE, key_prefix)

    def all_done() -> bool:
        nonlocal pending_max
        pending_max = max(pending_max, sync_redis.xpending(queue, p.GROUP)["pending"])
        return all(
            sync_redis.hget(p.meta_key(f"b{i}", key_prefix), "state") == b"done"
            for i in range(6))

    wait_until(all_done, 120, "six requests", interval_s=0.01)
    assert pending_max == 2 + max_waiting  # filled up to the bound, never past it


def test_speculative_daemon_is_lossless_and_exports_metrics(start_daemon, sync_redis, key_prefix,
                                                            tiny_model_path) -> None:
    """With the n-gram drafter the greedy output is unchanged, done reports an acceptance rate,
    and the Prometheus endpoint shows the request and draft counters. K is fixed: adaptive K
    may rightly draft nothing on a loaded machine, and then there is no rate to report."""
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    start_daemon(draft="ngram", metrics_port=port, adaptive_speculation=False)
    body = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    for i, prompt in enumerate(PROMPTS[:3]):
        enqueue(sync_redis, key_prefix, QUEUE, {**body, "prompt": prompt}, f"s{i}")
    expected = greedy_reference(str(tiny_model_path), PROMPTS[:3], 40)
    wait_all_finished(sync_redis, key_prefix, ["s0", "s1", "s2"], 60)
    for i in range(3):
        result = read_result(sync_redis, key_prefix, f"s{i}")
        assert (result.ids, result.text) == expected[i]
        assert isinstance(result.terminal, p.DoneEvent)
        assert result.terminal.timings.acceptance_rate is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'helix:request_success_total{finished_reason="length"} 3.0' in text
    assert "helix:spec_decode_num_draft_tokens_total" in text


def _history(model: str, prompt: str, params: object) -> list[tuple[list[int], str]]:
    """(ids so far, text emitted so far) after every step of an uninterrupted in-process run."""
    from helix_daemon.engine.config import EngineConfig
    from helix_daemon.engine.engine import Engine

    engine = Engine.from_config(EngineConfig(model=model, device="cpu", dtype="float64",
                                             num_kv_blocks=64))
    engine.add_request("h", prompt, params)
    ids: list[int] = []
    text = ""
    history = []
    while engine.has_unfinished():
        for output in engine.step():
            ids, text = ids + list(output.new_token_ids), text + output.text_delta
            history.append((ids, text))
    return history


async def _ghost_attempt(redis_url: str, prefix: str, request_id: str, ids: list[int],
                         text: str) -> None:
    """A first attempt by daemon "ghost" that streamed ``ids``/``text`` and then died."""
    import redis.asyncio as aioredis

    from helix_daemon.wire.store import Append, Store

    client = aioredis.Redis.from_url(redis_url)
    store = Store(client, prefix=prefix, queue=QUEUE, daemon_id="ghost", lease_ms=1500)
    await store.ensure_group()
    [(entry_id, _)] = await store.read_new(count=1, block_ms=100)
    claim = await store.claim(request_id, entry_id, now_ms=0, created_ms=0, max_attempts=3,
                              result_ttl_ms=60_000)
    event = p.TokenEvent(seq=0, att=claim.epoch, off=0, text=text, ids=ids)
    assert await store.append_many([Append(request_id, "ghost", event, 0, len(ids), 60_000)],
                                   0) == ["ok"]
    await client.aclose()


@pytest.mark.parametrize("stop", [
    pytest.param(None, id="no-stop"),
    pytest.param("en\x01", id="stop-prefix-held"),
])
def test_takeover_resumes_a_dead_attempt_exactly(start_daemon, sync_redis, key_prefix,
                                                 redis_url, tiny_model_path, stop) -> None:
    """A request whose first attempt streamed part of its output and died is resumed by a live
    daemon (lease lapse -> XAUTOCLAIM): the final ids and text equal an uninterrupted run, also
    when the cut falls where text was held back (a possible stop-string prefix)."""
    import asyncio

    from transformers import AutoTokenizer

    from scheduler.params import RequestParams, SamplingParams

    stops = (stop,) if stop else ()
    params = RequestParams(max_tokens=40, sampling=SamplingParams(temperature=0.0),
                           ignore_eos=True, stop=stops)
    history = _history(str(tiny_model_path), "Hello there", params)
    decode = AutoTokenizer.from_pretrained(tiny_model_path).decode
    held = [(ids, text) for ids, text in history
            if len(decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
            > len(text)]
    cut_ids, cut_text = held[0] if stop else history[len(history) // 2]
    enqueue(sync_redis, key_prefix, QUEUE, {"prompt": "Hello there", "max_tokens": 40,
                                            "temperature": 0, "ignore_eos": True,
                                            "stop": list(stops)}, "res")
    # the ghost takes the entry before any live daemon exists, so it is surely the first attempt
    asyncio.run(_ghost_attempt(redis_url, key_prefix, "res", cut_ids, cut_text))
    start_daemon()
    wait_all_finished(sync_redis, key_prefix, ["res"], 30)
    result = read_result(sync_redis, key_prefix, "res")
    assert result.attempts_seen == {1, 2}
    assert (result.ids, result.text) == history[-1]


def test_a_crashed_task_ends_the_daemon(start_daemon, sync_redis, key_prefix) -> None:
    """A bug that kills one of the daemon's loops (here: intake raising an unexpected error)
    ends the daemon with exit code 1 and unregisters it, instead of leaving a daemon that
    heartbeats but never pulls again; a job it never took is served by another daemon."""
    daemon = start_daemon()
    wait_until(lambda: sync_redis.exists(p.daemon_key("t0", key_prefix)), 30, "t0 up")
    bug = RuntimeError("injected bug in intake")

    async def broken_read(*args: object) -> None:
        raise bug

    daemon.daemon.store.read_new = broken_read
    wait_until(lambda: daemon.daemon._fatal is bug, 10, "the crash to end the daemon")
    assert daemon.stop() == 1
    assert not sync_redis.exists(p.daemon_key("t0", key_prefix))
    rid = "after-crash"
    enqueue(sync_redis, key_prefix, QUEUE, {"prompt": "Hello there", "max_tokens": 4}, rid)
    start_daemon()
    wait_all_finished(sync_redis, key_prefix, [rid], 30)
    assert isinstance(read_result(sync_redis, key_prefix, rid).terminal, p.DoneEvent)


def test_prefix_cache_through_redis_and_a_resume_that_hits_it(
        start_daemon, sync_redis, key_prefix, redis_url, tiny_model_path) -> None:
    """With prefix caching (the default): a request repeating an earlier prompt reports the
    reused prompt tokens as ``usage.cached_tokens``, the heartbeat and Prometheus report the
    hits; then a takeover resume of the same prompt (its first attempt died after streaming
    part of the output) starts from the cached blocks, its forced output's included, and
    still ends with the uninterrupted run's exact ids and text. A running blocker keeps the
    daemon full (max_num_seqs=1, no waiting room) so the dead attempt surely claims the
    resumed request first."""
    import urllib.request

    from scheduler.params import RequestParams, SamplingParams
    from tests.conftest import free_port

    prompt = " ".join(PROMPTS)  # a few blocks long
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    history = _history(str(tiny_model_path), prompt, RequestParams(
        max_tokens=40, sampling=SamplingParams(temperature=0.0), ignore_eos=True))
    port = free_port()
    start_daemon(max_num_seqs=1, max_waiting=0, metrics_port=port)
    for rid in ("warm", "again"):
        enqueue(sync_redis, key_prefix, QUEUE, body, rid)
        wait_all_finished(sync_redis, key_prefix, [rid], 60)
    usage = {rid: read_result(sync_redis, key_prefix, rid).terminal.usage
             for rid in ("warm", "again")}
    assert usage["warm"].cached_tokens == 0
    assert 0 < usage["again"].cached_tokens < usage["again"].prompt_tokens
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f"helix:prefix_cache_hits_total {float(usage['again'].cached_tokens)}" in text
    assert "helix:prefix_cache_queries_total" in text

    def hit_rate() -> float | None:
        raw = sync_redis.get(p.daemon_key("t0", key_prefix))
        return json.loads(raw).get("prefix_cache_hit_rate") if raw else None

    wait_until(lambda: hit_rate() is not None, 10, "a heartbeat with a hit rate")
    enqueue(sync_redis, key_prefix, QUEUE, LONG, "blocker")
    wait_until(lambda: first_tokens_seen(sync_redis, key_prefix, "blocker"), 60, "the blocker")
    enqueue(sync_redis, key_prefix, QUEUE, body, "res")
    cut_ids, cut_text = history[len(history) // 2]
    asyncio.run(_ghost_attempt(redis_url, key_prefix, "res", cut_ids, cut_text))
    sync_redis.hset(p.meta_key("blocker", key_prefix), "cancel", "1")
    sync_redis.publish(p.cancel_channel(key_prefix), "blocker")
    wait_all_finished(sync_redis, key_prefix, ["res"], 60)
    result = read_result(sync_redis, key_prefix, "res")
    assert result.attempts_seen == {1, 2}
    assert (result.ids, result.text) == history[-1]
    # the whole prompt and the first output blocks (registered by "warm") came from the cache
    assert result.terminal.usage.cached_tokens == result.terminal.usage.prompt_tokens
