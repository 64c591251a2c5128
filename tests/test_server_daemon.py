"""The daemon's own logic (claims, head starts, flushes, acks, retires) against a real Redis,
with the scripted ``FakeEngine`` in place of a model: each test runs in well under a second."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from helix_daemon.client.aio import AsyncHelixClient
from helix_daemon.config import DaemonConfig
from helix_daemon.server.daemon import Daemon
from helix_daemon.server.run import redis_client, run_in_background
from helix_daemon.wire import protocol as p
from tests.fake_engine import FakeEngine, expected_ids

QUEUE = "fq"
StartDaemon = Callable[..., Awaitable[tuple[Daemon, FakeEngine]]]


async def until(condition: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Wait for an observable condition (the timeout only bounds a failing test)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def start_daemon(redis_url: str, key_prefix: str) -> AsyncIterator[StartDaemon]:
    """Start daemons on this test's loop, each with a ``FakeEngine``; stop them afterwards."""
    running: list[tuple[Daemon, asyncio.Task[int], aioredis.Redis]] = []

    async def start(engine: FakeEngine | None = None, **overrides: Any
                    ) -> tuple[Daemon, FakeEngine]:
        engine = engine or FakeEngine()
        settings: dict[str, Any] = {"model": "fake", "key_prefix": key_prefix, "queue": QUEUE,
                                    "daemon_id": f"fake{len(running)}", "drain_timeout_s": 1.0}
        client = redis_client(redis_url)
        daemon = Daemon(DaemonConfig(**{**settings, **overrides}), engine, client)
        running.append((daemon, await run_in_background(daemon), client))
        return daemon, engine

    yield start
    for daemon, task, client in running:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 15) == 0
        await client.aclose()


@pytest.fixture
async def helix(redis_url: str, key_prefix: str) -> AsyncIterator[AsyncHelixClient]:
    client = AsyncHelixClient.from_url(redis_url, prefix=key_prefix, queue=QUEUE)
    yield client
    await client.aclose()


async def num_pending(redis: aioredis.Redis, daemon: Daemon) -> int:
    """Entries of the queue read by some daemon and not acked yet."""
    return int((await redis.xpending(daemon.store.queue_key, p.GROUP))["pending"])


async def test_a_request_goes_from_head_start_to_ack(start_daemon: StartDaemon,
                                                     helix: AsyncHelixClient) -> None:
    """A new entry starts in the engine before its claim (under ``<request id>@<entry id>``),
    streams every token, ends with ``done``; its entry is then acked and its slot freed, and a
    sequence that finished by itself is never aborted."""
    daemon, engine = await start_daemon()
    all_slots = daemon.free_slots()
    rid = await helix.submit("one two three", request_id="r1", max_tokens=5)
    result = await helix.result(rid, timeout_s=10)
    assert result.ok and result.finish_reason == "length"
    assert result.token_ids == expected_ids(3, 5)
    entry_id = (await helix.meta(rid))["entry_id"]
    assert engine.added == [f"{rid}@{entry_id}"]
    await until(lambda: daemon.free_slots() == all_slots, 5, "the slot to be freed")
    assert await num_pending(helix.redis, daemon) == 0
    assert engine.aborted == []


async def test_a_request_finished_before_its_claim_returns_is_written(
        start_daemon: StartDaemon, helix: AsyncHelixClient) -> None:
    """The engine finishes a head-started request while its claim is still on the way (forced
    here by holding the claim back until then): the claim's answer writes what was held,
    though no later engine step asks for that flush."""
    daemon, engine = await start_daemon()
    claim_many = daemon.store.claim_many

    async def claim_once_the_engine_finished(*args: Any, **kwargs: Any) -> Any:
        await until(lambda: engine.finished, 10, "the engine to finish the head start")
        return await claim_many(*args, **kwargs)

    daemon.store.claim_many = claim_once_the_engine_finished  # type: ignore[method-assign]
    rid = await helix.submit("Hello there", max_tokens=4)
    result = await helix.result(rid, timeout_s=10)
    assert result.ok and result.token_ids == expected_ids(2, 4)


async def test_the_ack_of_a_trimmed_entry_is_sent_at_once(start_daemon: StartDaemon,
                                                          helix: AsyncHelixClient) -> None:
    """An entry whose owner died and which was trimmed from the stream is dead-lettered and
    acked by the daemon that reclaims it. That ack must ask for a flush itself: until it is
    sent it holds one of the daemon's slots, and with no request running nothing else would
    ever flush it (the bug: the slot stayed taken; with a single slot, intake stopped)."""
    redis, queue_key = helix.redis, p.queue_key(QUEUE, helix.prefix)
    await redis.xgroup_create(queue_key, p.GROUP, id="0", mkstream=True)
    ghost_entry = await redis.xadd(queue_key, {"x": "1"})
    await redis.xreadgroup(p.GROUP, "ghost", {queue_key: ">"}, count=1)  # then it died
    await redis.xdel(queue_key, ghost_entry)
    daemon, _ = await start_daemon(max_num_seqs=1, max_waiting=0, lease_ms=200,
                                   reclaim_interval_s=0.05)
    for _ in range(500):
        if await redis.xlen(daemon.store.dlq_key):
            break
        await asyncio.sleep(0.01)
    [(_, record)] = await redis.xrange(daemon.store.dlq_key)
    assert record[b"reason"].startswith(b"trimmed")
    # No request runs, so no engine step or write will flush the ack for it.
    await until(lambda: daemon.free_slots() == 1, 5, "the ack to be sent and free its slot")
    rid = await helix.submit("a b", max_tokens=2)
    result = await helix.result(rid, timeout_s=10)
    assert result.ok and result.token_ids == expected_ids(2, 2)


async def test_a_cancel_aborts_the_running_sequence(start_daemon: StartDaemon,
                                                    helix: AsyncHelixClient) -> None:
    """A cancel of a running request aborts its engine sequence and writes ``cancelled``;
    its entry is acked."""
    daemon, engine = await start_daemon()
    engine.pause()  # the request stays running until it is cancelled
    rid = await helix.submit("x y z", max_tokens=50)
    await until(lambda: engine.added, 10, "the request to reach the engine")
    await until(lambda: daemon.free_slots() < daemon.config.max_num_seqs +
                daemon.config.max_waiting, 10, "the claim")
    assert await helix.cancel(rid)
    result = await helix.result(rid, timeout_s=10)
    assert result.state == "cancelled"
    await until(lambda: engine.aborted == engine.added, 10, "the sequence to be aborted")
    engine.resume()
    for _ in range(500):
        if await num_pending(helix.redis, daemon) == 0:
            break
        await asyncio.sleep(0.01)
    assert await num_pending(helix.redis, daemon) == 0


async def test_a_request_the_engine_rejects_ends_with_its_error(
        start_daemon: StartDaemon, helix: AsyncHelixClient) -> None:
    """The engine refuses a head-started request (too long for it): the refusal, held until
    the claim answered, becomes the request's ``error`` event."""
    _, engine = await start_daemon(FakeEngine(max_model_len=8))
    rid = await helix.submit("one two three", max_tokens=20)
    result = await helix.result(rid, timeout_s=10)
    assert result.state == "error" and result.error_code == "invalid_request"
    assert engine.finished == []


async def test_engine_stats_come_from_the_steps(start_daemon: StartDaemon,
                                                helix: AsyncHelixClient) -> None:
    """Before the engine's first step the daemon holds the engine's starting stats (published
    when the engine starts: no KV used, all slots free) and its heartbeat shows the pool's size;
    after a request ran, ``engine_stats`` is the latest step's."""
    daemon, _ = await start_daemon()
    config = daemon.config
    assert daemon.engine_stats is not None and daemon.engine_stats.num_steps == 0
    assert daemon.free_slots() == config.max_num_seqs + config.max_waiting
    beat_key = p.daemon_key(config.daemon_id, config.key_prefix)
    for _ in range(500):
        if beat := await helix.redis.get(beat_key):
            break
        await asyncio.sleep(0.01)
    assert beat is not None and json.loads(beat)["kv_blocks_total"] == 64
    rid = await helix.submit("one two", max_tokens=3)
    assert (await helix.result(rid, timeout_s=10)).ok
    await until(lambda: daemon.engine_stats is not None
                and daemon.engine_stats.num_running == 0, 5, "the last step's stats")
    stats = daemon.engine_stats
    assert stats is not None and stats.num_steps >= 3 and stats.kv_blocks_used == 0
