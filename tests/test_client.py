"""The Python clients speak protocol v1 against the shared Redis: submit, stream, result, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.asyncio as aioredis

from helix_daemon.client import AsyncHelixClient, HelixClient, StreamGapError
from helix_daemon.wire.protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Timings,
    TokenEvent,
    Usage,
    cancel_channel,
    decode_request,
    encode_event,
    meta_key,
    out_key,
    queue_key,
)
from scheduler.errors import InvalidRequestError


def _write(r: redis.Redis, key: str, *events: object) -> None:
    """Append events the way a daemon does (protocol encoding, one XADD each)."""
    for event in events:
        r.xadd(key, encode_event(event))


def _done(seq: int, att: int = 1) -> DoneEvent:
    return DoneEvent(seq, att, "length", Usage(3, 4),
                     Timings(queue_wait_s=0.01, ttft_s=0.02, tokens_per_s=100.0,
                             acceptance_rate=None, attempts=att))


@pytest.fixture
def client(redis_url: str, key_prefix: str):
    c = HelixClient.from_url(redis_url, prefix=key_prefix)
    yield c
    c.close()


@pytest.fixture
async def aclient(redis_url: str, key_prefix: str):
    # Named after the test's prefix, so CLIENT LIST can tell its connections from others'.
    c = AsyncHelixClient(aioredis.Redis.from_url(redis_url, client_name=key_prefix),
                         prefix=key_prefix)
    yield c
    await c.aclose()


def test_submit_writes_a_valid_entry_and_queued_meta(client: HelixClient, sync_redis,
                                                     key_prefix: str) -> None:
    """submit() XADDs an entry the daemon's decoder accepts and records state/queue/TTL in meta.

    A generated id goes in one round trip, so its meta has no entry id until a daemon claims
    the entry; a client-chosen id is reserved first and its entry id recorded.
    """
    generated = client.submit("Hello", max_tokens=8, temperature=0, stop=["\n"])
    chosen = client.submit("Hello", request_id="mine", max_tokens=8)
    entries = sync_redis.xrange(queue_key("default", key_prefix))
    assert len(entries) == 2
    requests = [decode_request(fields, entry_id.decode()) for entry_id, fields in entries]
    assert [r.request_id for r in requests] == [generated, chosen]
    body = requests[0].body
    assert body.prompt == "Hello" and body.max_tokens == 8
    assert body.temperature == 0.0 and body.stop == ["\n"]
    for rid in (generated, chosen):
        meta = client.meta(rid)
        assert meta["state"] == "queued" and meta["queue"] == "default"
        assert int(meta["created_ms"]) > 0
        assert 0 < sync_redis.ttl(meta_key(rid, key_prefix)) <= 86_400
    assert "entry_id" not in client.meta(generated)
    assert client.meta(chosen)["entry_id"] == entries[1][0].decode()


def test_submit_is_idempotent_on_request_id(client: HelixClient, sync_redis,
                                            key_prefix: str) -> None:
    """Submitting one id twice (a retry) enqueues once; token-id prompts can go to another queue."""
    assert client.submit([1, 2, 3], request_id="job-1", queue="q2") == "job-1"
    assert client.submit([1, 2, 3], request_id="job-1", queue="q2") == "job-1"
    assert sync_redis.xlen(queue_key("q2", key_prefix)) == 1
    _, fields = sync_redis.xrange(queue_key("q2", key_prefix))[0]
    assert b'"prompt_token_ids":[1,2,3]' in fields[b"body"]


@pytest.mark.parametrize("prompt, params", [
    ("hi", {"bogus": 1}),                          # unknown field
    ("hi", {"max_tokens": "8"}),                   # wrong type (strict)
    ("hi", {"prompt_token_ids": [1]}),             # both prompt kinds
    (None, {}),                                    # no prompt at all
    ("hi", {"temperature": -1.0}),                 # out of range
    ("hi", {"max_tokens": 0}),
])
def test_invalid_requests_are_refused_client_side(client: HelixClient, sync_redis,
                                                  key_prefix: str, prompt, params) -> None:
    """Validation uses the protocol struct and the engine's rules: nothing reaches Redis."""
    with pytest.raises(InvalidRequestError):
        client.submit(prompt, **params)
    assert sync_redis.xlen(queue_key("default", key_prefix)) == 0
    with pytest.raises(ValueError):
        client.submit("hi", request_id="bad{id}")


def test_stream_dedupes_by_seq_and_resumes(client: HelixClient, sync_redis,
                                           key_prefix: str) -> None:
    """A duplicated event (retried write) is delivered once; a takeover (att 2) continues the
    same output; from_seq skips what the reader already has; the terminal event ends it."""
    key = out_key("r1", key_prefix)
    _write(sync_redis, key,
           TokenEvent(0, 1, 0, "He", [10, 11]),
           TokenEvent(0, 1, 0, "He", [10, 11]),
           TokenEvent(1, 2, 2, "llo", [12]),
           TokenEvent(2, 2, 3, "!", [13]),
           _done(3, att=2))
    seqs = [e.seq for e in client.stream("r1")]
    assert seqs == [0, 1, 2, 3]
    assert [e.seq for e in client.stream("r1", from_seq=2)] == [2, 3]
    result = client.result("r1", timeout_s=5)
    assert result.ok and result.text == "Hello!" and result.token_ids == [10, 11, 12, 13]
    # Usage(3, 4): no cached_tokens given, so it reads as 0 (nothing from the prefix cache)
    assert result.finish_reason == "length" and result.usage == {
        "prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0}
    assert result.timings["attempts"] == 2 and result.attempts == 2


def test_result_reports_error_and_cancelled(client: HelixClient, sync_redis,
                                            key_prefix: str) -> None:
    """Error and cancelled terminals come back as results with their code/reason, not raises."""
    _write(sync_redis, out_key("e", key_prefix), ErrorEvent(0, 1, "invalid_request", "too long"))
    _write(sync_redis, out_key("c", key_prefix), TokenEvent(0, 1, 0, "a", [5]),
           CancelledEvent(1, 1, "cancelled by client"))
    err = client.result("e", timeout_s=5)
    assert err.state == "error" and err.error_code == "invalid_request" and not err.ok
    cancelled = client.result("c", timeout_s=5)
    assert cancelled.state == "cancelled" and cancelled.text == "a"


def test_result_times_out_and_gap_is_detected(client: HelixClient, sync_redis,
                                              key_prefix: str) -> None:
    """No terminal event within timeout_s raises TimeoutError; a missing seq raises
    StreamGapError after re-reading instead of silently skipping output."""
    with pytest.raises(TimeoutError):
        client.result("never", timeout_s=0.3)
    _write(sync_redis, out_key("g", key_prefix), TokenEvent(1, 1, 0, "x", [1]), _done(2))
    with pytest.raises(StreamGapError):
        client.result("g", timeout_s=5)


@pytest.mark.perf
def test_result_timeout_is_not_stretched_to_the_block(client: HelixClient) -> None:
    """A 0.3 s timeout ends the wait in well under 2 s: the blocking read is cut to the time
    left instead of running its full block (2 s by default)."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client.result("never", timeout_s=0.3)
    assert time.monotonic() - start < 2


def test_cancel_sets_flag_and_publishes(client: HelixClient, sync_redis, key_prefix: str) -> None:
    """cancel() sets meta.cancel=1 (durable), publishes the id (nudge), keeps a TTL, and says
    False for a request that already finished."""
    pubsub = sync_redis.pubsub()
    pubsub.subscribe(cancel_channel(key_prefix))
    pubsub.get_message(timeout=1)  # subscribe confirmation
    rid = client.submit("x")
    assert client.cancel(rid) is True
    assert client.meta(rid)["cancel"] == "1"
    msg = pubsub.get_message(timeout=2)
    assert msg is not None and msg["data"] == rid.encode()
    assert client.cancel("unknown-id") is True
    assert sync_redis.ttl(meta_key("unknown-id", key_prefix)) > 0  # no leaked key
    sync_redis.hset(meta_key("finished", key_prefix), "state", "done")
    assert client.cancel("finished") is False
    pubsub.close()


async def test_async_client_round_trip(aclient: AsyncHelixClient, async_redis,
                                       key_prefix: str) -> None:
    """The async client submits idempotently and streams events written while it waits
    (blocking XREAD wakes up on new entries)."""
    rid = await aclient.submit("Hi", request_id="a1", max_tokens=2)
    assert await aclient.submit("Hi", request_id="a1", max_tokens=2) == rid
    assert await async_redis.xlen(queue_key("default", key_prefix)) == 1
    key = out_key(rid, key_prefix)

    async def writer() -> None:  # each event lands while the client is blocked in XREAD
        await _until(lambda: _num_blocked_xreads(async_redis, key_prefix, 1), "a blocked read")
        await async_redis.xadd(key, encode_event(TokenEvent(0, 1, 0, "A", [7])))
        await _until(lambda: _num_blocked_xreads(async_redis, key_prefix, 1), "the shared read")
        await async_redis.xadd(key, encode_event(_done(1)))

    task = asyncio.create_task(writer())
    result = await aclient.result(rid, timeout_s=5)
    await task
    assert result.text == "A" and result.token_ids == [7] and result.ok
    assert await aclient.cancel(rid) is True


async def _blocked_xreads(r: aioredis.Redis, name: str) -> set[int]:
    """Ids of the connections named ``name`` that are blocked in XREAD right now."""
    return {int(c["id"]) for c in await r.client_list()
            if c.get("name") == name and c.get("cmd") == "xread" and "b" in c.get("flags", "")}


async def _num_blocked_xreads(r: aioredis.Redis, name: str, expected: int) -> bool:
    return len(await _blocked_xreads(r, name)) == expected


async def _until(condition: Callable[[], Awaitable[bool]], what: str,
                 timeout_s: float = 10.0) -> None:
    """Wait until ``condition`` holds (polling); a fixed sleep would be too short on a loaded
    machine or needlessly long on a quiet one."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def _follow(aclient: AsyncHelixClient, rid: str) -> tuple[asyncio.Task[list[int]], asyncio.Event]:
    """Follow ``rid`` with long blocks (only a wake-up ends them early): the task returns the
    seqs seen; the event is set on the first one. The stream then leaves its own read and joins
    the shared one before its task next waits, so once the event is set, every later event of
    ``rid`` can only come through the shared read."""
    first = asyncio.Event()

    async def run() -> list[int]:
        seqs: list[int] = []
        async for event in aclient.stream(rid, block_ms=60_000, timeout_s=30):
            seqs.append(event.seq)
            first.set()
        return seqs

    return asyncio.create_task(run()), first


async def test_async_streams_share_one_blocking_read(aclient: AsyncHelixClient, async_redis,
                                                     key_prefix: str) -> None:
    """Streams read alone until their first event, then thirty of them wait in ONE blocking
    XREAD; each still gets exactly its own events (duplicates dropped). A stream that joins
    while that read is blocked (for 4 s: 0.8 of redis-py's socket timeout) wakes it with
    CLIENT UNBLOCK: its next event arrives at once instead of after the block."""
    rids = [f"m{i}" for i in range(30)]
    async def first_token(rid: str, i: int) -> None:
        await async_redis.xadd(out_key(rid, key_prefix),
                               encode_event(TokenEvent(0, 1, 0, "x", [i])))

    def blocked(expected: int) -> Callable[[], Awaitable[bool]]:
        return lambda: _num_blocked_xreads(async_redis, key_prefix, expected)

    followed = [_follow(aclient, rid) for rid in rids[:-1]]
    tasks = [task for task, _ in followed]
    await _until(blocked(len(rids) - 1), "each stream blocked in a read of its own")
    for i, rid in enumerate(rids[:-1]):
        await first_token(rid, i)
    for _, first in followed:
        await asyncio.wait_for(first.wait(), 10)
    # every stream has left its own read: from now on only the shared read can block
    await _until(blocked(1), "one shared read")
    late, late_first = _follow(aclient, rids[-1])
    await first_token(rids[-1], 29)
    await asyncio.wait_for(late_first.wait(), 10)  # read alone, then joined the blocked read
    await _until(blocked(1), "the shared read, taking the late stream too")
    await async_redis.xadd(out_key(rids[-1], key_prefix), encode_event(_done(1)))
    # well under the 4 s block: the join woke the shared read
    assert await asyncio.wait_for(late, timeout=2) == [0, 1]
    for i, rid in enumerate(rids[:-1]):
        await first_token(rid, i)  # a retried write: delivered once
        await async_redis.xadd(out_key(rid, key_prefix), encode_event(_done(1)))
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert results == [[0, 1]] * (len(rids) - 1)


async def test_async_stream_gap_timeout_and_second_reader(aclient: AsyncHelixClient,
                                                          async_redis, key_prefix: str) -> None:
    """Through the shared read, a missing seq still raises StreamGapError (for that stream
    alone), a silent stream raises TimeoutError, and a second reader of a stream that is
    already followed reads it on its own and sees the same events."""
    await async_redis.xadd(out_key("gap", key_prefix), encode_event(TokenEvent(1, 1, 0, "x", [1])))
    with pytest.raises(StreamGapError):
        await aclient.result("gap", timeout_s=5)
    with pytest.raises(TimeoutError):
        await aclient.result("silent", timeout_s=0.3)

    key = out_key("two", key_prefix)
    first = asyncio.create_task(aclient.result("two", timeout_s=10))
    second = asyncio.create_task(aclient.result("two", timeout_s=10))
    await _until(lambda: _num_blocked_xreads(async_redis, key_prefix, 2), "both readers")
    await async_redis.xadd(key, encode_event(TokenEvent(0, 1, 0, "ok", [3])))
    await async_redis.xadd(key, encode_event(_done(1)))
    a, b = await asyncio.gather(first, second)
    assert a.text == b.text == "ok" and a.ok and b.ok


async def test_closing_the_async_client_ends_its_streams(redis_url: str, key_prefix: str) -> None:
    """A stream still waiting when its client closes raises a ConnectionError instead of
    hanging forever."""
    c = AsyncHelixClient(aioredis.Redis.from_url(redis_url, client_name=key_prefix),
                         prefix=key_prefix)
    waiting = asyncio.create_task(c.result("never-written", timeout_s=30))
    watcher = aioredis.Redis.from_url(redis_url)
    try:
        await _until(lambda: _num_blocked_xreads(watcher, key_prefix, 1), "the stream's read")
    finally:
        await watcher.aclose()
    await c.aclose()
    with pytest.raises(redis.ConnectionError):
        await asyncio.wait_for(waiting, timeout=5)


# --- against a real daemon ------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_prefix(module_prefix: str) -> str:
    return module_prefix


@pytest.fixture(scope="module")
def live_daemon(live_prefix: str, redis_url: str):
    from tests.daemon_harness import start_thread_daemon
    from tests.tiny import tiny_model

    daemon = start_thread_daemon(tiny_model(), redis_url, live_prefix)
    yield daemon
    assert daemon.stop() == 0


async def test_end_to_end_greedy_requests(live_daemon, live_prefix: str, redis_url: str) -> None:
    """Through a real daemon: identical greedy requests give identical outputs, the streamed
    deltas concatenate to the final text, and usage/timings describe the run."""
    client = AsyncHelixClient.from_url(redis_url, prefix=live_prefix)
    try:
        ids = [await client.submit("The cat sat on", max_tokens=12, temperature=0,
                                   ignore_eos=True) for _ in range(3)]
        streamed = []
        async for event in client.stream(ids[0], timeout_s=30):
            if isinstance(event, TokenEvent):
                streamed.append(event.text)
        results = await asyncio.gather(*(client.result(rid, timeout_s=30) for rid in ids))
    finally:
        await client.aclose()
    first = results[0]
    assert all(r.ok and r.finish_reason == "length" for r in results)
    assert len(first.token_ids) == 12 and first.usage["completion_tokens"] == 12
    assert all(r.token_ids == first.token_ids and r.text == first.text for r in results)
    assert "".join(streamed) == first.text
    assert first.timings["attempts"] == 1 and first.timings["ttft_s"] is not None


def test_daemon_rejection_comes_back_as_an_error_result(live_daemon, live_prefix: str,
                                                        sync_redis, redis_url: str) -> None:
    """A producer that skips client validation (raw XADD, as from redis-cli) gets an `error`
    event with code invalid_request, which result() reports instead of hanging."""
    sync_redis.xadd(queue_key("default", live_prefix),
                    {"v": "1", "id": "raw-1", "body": '{"prompt": "x", "max_tokens": 0}'})
    with HelixClient.from_url(redis_url, prefix=live_prefix) as client:
        result = client.result("raw-1", timeout_s=30)
    assert result.state == "error" and result.error_code == "invalid_request"


async def test_shared_read_survives_a_dropped_connection(aclient: AsyncHelixClient, async_redis,
                                                         key_prefix: str) -> None:
    """When the shared read's connection is killed, the read is retried on a new connection (a
    new client id); streams already followed go on, and a stream joining later still wakes the
    read at once (CLIENT UNBLOCK names the new connection, not the dead one)."""
    async def event(rid: str, ev: object) -> None:
        await async_redis.xadd(out_key(rid, key_prefix), encode_event(ev))

    async def one_new_read() -> bool:  # the read is retried after a backoff
        now = await _blocked_xreads(async_redis, key_prefix)
        return len(now) == 1 and shared not in now

    a, a_first = _follow(aclient, "a")
    await event("a", TokenEvent(0, 1, 0, "x", [1]))
    await asyncio.wait_for(a_first.wait(), 10)  # "a" left its own read for the shared one
    await _until(lambda: _num_blocked_xreads(async_redis, key_prefix, 1), "the shared read")
    [shared] = await _blocked_xreads(async_redis, key_prefix)
    await async_redis.client_kill_filter(_id=shared)
    await _until(one_new_read, "the shared read on a new connection")
    b, b_first = _follow(aclient, "b")
    await event("b", TokenEvent(0, 1, 0, "y", [2]))
    await asyncio.wait_for(b_first.wait(), 10)  # read alone, then joined the shared read
    await event("b", _done(1))
    assert await asyncio.wait_for(b, timeout=2) == [0, 1]
    await event("a", _done(1))
    assert await asyncio.wait_for(a, timeout=2) == [0, 1]


async def test_a_slow_consumer_still_gets_the_terminal_event(aclient: AsyncHelixClient,
                                                            async_redis, key_prefix: str) -> None:
    """The shared read runs ahead of a consumer that is slow between events: the events it
    queued, the terminal one included, are all delivered, in order."""
    key = out_key("slow", key_prefix)
    await async_redis.xadd(key, encode_event(TokenEvent(0, 1, 0, "a", [1])))
    seen: list[int] = []
    async for event in aclient.stream("slow", timeout_s=30):
        seen.append(event.seq)
        if event.seq == 0:  # read alone; what follows comes through the shared read
            await async_redis.xadd(key, encode_event(TokenEvent(1, 1, 1, "b", [2])))
        if event.seq == 1:  # the rest arrives in another reply while we dawdle
            await async_redis.xadd(key, encode_event(TokenEvent(2, 1, 2, "c", [3])))
            await async_redis.xadd(key, encode_event(_done(3)))
            await asyncio.sleep(0.3)
    assert seen == [0, 1, 2, 3]


@pytest.fixture
def unix_redis(tmp_path):
    """A private redis-server listening on a Unix socket only (port 0: no TCP)."""
    import shutil
    import subprocess

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "redis-server did not open its socket"
        time.sleep(0.05)
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(10)


async def test_unix_socket_urls_carry_the_whole_protocol(unix_redis: str) -> None:
    """A ``unix://`` URL gets the hiredis packer too (from_url would otherwise pick its own
    connection class), and a submit, a fenced claim and append, and a followed stream all work
    over it."""
    from helix_daemon.wire.connection import HiredisPackedUnixConnection, async_redis
    from helix_daemon.wire.store import Append, Store

    client = AsyncHelixClient.from_url(unix_redis, prefix="ux")
    raw = async_redis(unix_redis)
    try:
        assert client.redis.connection_pool.connection_class is HiredisPackedUnixConnection
        rid = await client.submit("hi", max_tokens=2)
        store = Store(raw, prefix="ux", queue="default", daemon_id="d", lease_ms=60_000)
        claim = await store.claim(rid, "1-0", now_ms=1, created_ms=1, max_attempts=3,
                                  result_ttl_ms=60_000)
        ops = [Append(rid, "d", TokenEvent(0, claim.epoch, 0, "ok", [5]), 0, 1, 60_000),
               Append(rid, "d", _done(1, att=claim.epoch), 1, 1, 60_000,
                      terminal_state="done", finish_reason="length")]
        assert await store.append_many(ops, now_ms=2) == ["ok", "ok"]
        result = await client.result(rid, timeout_s=10)
        assert result.ok and result.text == "ok" and result.token_ids == [5]
    finally:
        await client.aclose()
        await raw.aclose()
