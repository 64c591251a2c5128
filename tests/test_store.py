"""Lua scripts and queue verbs against the real shared Redis (unique prefixes per test)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from helix_daemon.wire import protocol as p
from helix_daemon.wire.store import Append, Claim, ClaimRequest, Store

TTL_MS = 60_000


def make_store(client: aioredis.Redis, prefix: str, daemon_id: str, lease_ms: int = 200) -> Store:
    return Store(client, prefix=prefix, queue="q", daemon_id=daemon_id, lease_ms=lease_ms)


async def claim(store: Store, rid: str, entry_id: str = "1-0", max_attempts: int = 3) -> Claim:
    return await store.claim(rid, entry_id, now_ms=1, created_ms=1, max_attempts=max_attempts,
                             result_ttl_ms=TTL_MS)


def token(store: Store, rid: str, c: Claim, seq: int, off: int, ids: list[int]) -> Append:
    event = p.TokenEvent(seq=seq, att=c.epoch, off=off, text="t" * len(ids), ids=ids)
    return Append(rid, store.daemon_id, event, off, off + len(ids), TTL_MS)


def finish(store: Store, rid: str, c: Claim, seq: int, off: int) -> Append:
    event = p.ErrorEvent(seq=seq, att=c.epoch, code="timeout", message="late")
    return Append(rid, store.daemon_id, event, off, off, TTL_MS, terminal_state="error",
                  error_code="timeout")


async def read_events(client: aioredis.Redis, prefix: str, rid: str) -> list[p.Event]:
    return [p.decode_event(f) for _, f in await client.xrange(p.out_key(rid, prefix))]


async def test_claim_emit_finish_writes_a_gap_free_stream(async_redis, key_prefix) -> None:
    """A fresh claim is epoch 1; tokens then a terminal event land in order and settle meta."""
    store = make_store(async_redis, key_prefix, "d1")
    c = await claim(store, "r")
    assert (c.status, c.epoch, c.next_seq, c.next_off, c.attempts) == ("ok", 1, 0, 0, 1)
    ops = [token(store, "r", c, 0, 0, [5, 6]), token(store, "r", c, 1, 2, [7]),
           finish(store, "r", c, 2, 3)]
    assert await store.append_many(ops, now_ms=2) == ["ok", "ok", "ok"]
    events = await read_events(async_redis, key_prefix, "r")
    assert [e.seq for e in events] == [0, 1, 2]
    assert isinstance(events[-1], p.ErrorEvent) and events[-1].code == "timeout"
    meta = await async_redis.hgetall(p.meta_key("r", key_prefix))
    assert meta[b"state"] == b"error" and meta[b"next_off"] == b"3" and meta[b"next_seq"] == b"3"
    assert 0 < await async_redis.pttl(p.out_key("r", key_prefix)) <= TTL_MS
    assert await store.committed_token_ids("r") == [5, 6, 7]


async def test_retried_writes_are_idempotent_and_gaps_refused(async_redis, key_prefix) -> None:
    """Re-sending a landed write answers dup (no second copy); skipping a seq answers gap."""
    store = make_store(async_redis, key_prefix, "d1")
    c = await claim(store, "r")
    op = token(store, "r", c, 0, 0, [1])
    assert await store.append_many([op], 0) == ["ok"]
    assert await store.append_many([op], 0) == ["dup"]
    assert await store.append_many([token(store, "r", c, 2, 1, [2])], 0) == ["gap"]
    assert await store.append_many([token(store, "r", c, 1, 5, [2])], 0) == ["gap"]
    assert len(await read_events(async_redis, key_prefix, "r")) == 1


async def test_one_append_call_judges_each_request_on_its_own(async_redis, key_prefix) -> None:
    """A flush round of several requests goes in one script call, and each write gets its own
    answer: one request's ok, another's dup, gap, gone, and a script error on a broken key
    (a meta hash overwritten by a string) leave every other write in the round intact."""
    store = make_store(async_redis, key_prefix, "d1")
    ca, cb, cc = await claim(store, "a"), await claim(store, "b"), await claim(store, "c")
    landed = token(store, "b", cb, 0, 0, [4])
    await store.append_many([landed], 0)
    await async_redis.set(p.meta_key("c", key_prefix), "not a hash")
    ops = [token(store, "a", ca, 0, 0, [1]), landed, token(store, "b", cb, 2, 1, [5]),
           token(store, "c", cc, 0, 0, [6]), token(store, "nobody", ca, 0, 0, [7]),
           token(store, "a", ca, 1, 1, [2])]
    replies = await store.append_many(ops, 0)
    assert replies[:3] == ["ok", "dup", "gap"] and replies[4:] == ["gone", "ok"]
    assert replies[3].startswith("error: ") and "WRONGTYPE" in replies[3]
    assert await store.committed_token_ids("a") == [1, 2]
    assert await store.committed_token_ids("b") == [4]


async def test_takeover_fences_the_old_owner(async_redis, key_prefix) -> None:
    """A second claim bumps the epoch, keeps seq/off, and the old owner's writes are refused."""
    old, new = make_store(async_redis, key_prefix, "d1"), make_store(async_redis, key_prefix, "d2")
    c1 = await claim(old, "r")
    await old.append_many([token(old, "r", c1, 0, 0, [1, 2])], 0)
    c2 = await claim(new, "r")
    assert (c2.status, c2.epoch, c2.next_seq, c2.next_off, c2.attempts) == ("ok", 2, 1, 2, 2)
    assert await old.append_many([token(old, "r", c1, 1, 2, [3])], 0) == ["fenced"]
    assert await old.append_many([finish(old, "r", c1, 1, 2)], 0) == ["fenced"]
    assert await new.append_many([token(new, "r", c2, 1, 2, [9])], 0) == ["ok"]
    events = await read_events(async_redis, key_prefix, "r")
    assert [(e.seq, e.att) for e in events] == [(0, 1), (1, 2)]


async def test_claim_settles_terminal_duplicate_cancelled_and_poison(async_redis,
                                                                     key_prefix) -> None:
    """claim refuses to run final requests, duplicates, queued cancels and poison jobs."""
    store = make_store(async_redis, key_prefix, "d1")
    c = await claim(store, "done")
    await store.append_many([finish(store, "done", c, 0, 0)], 0)
    assert (await claim(store, "done")).status == "final"

    await claim(store, "dup", entry_id="1-0")
    assert (await claim(store, "dup", entry_id="2-0")).status == "duplicate"

    await async_redis.hset(p.meta_key("cx", key_prefix), "cancel", "1")
    assert (await claim(store, "cx")).status == "cancelled"
    events = await read_events(async_redis, key_prefix, "cx")
    assert [type(e) for e in events] == [p.CancelledEvent] and events[0].seq == 0

    statuses = [(await claim(store, "poison", max_attempts=2)).status for _ in range(3)]
    assert statuses == ["ok", "ok", "poison"]
    last = (await read_events(async_redis, key_prefix, "poison"))[-1]
    assert isinstance(last, p.ErrorEvent) and last.code == "poison"


async def test_cancel_flag_turns_the_next_token_into_cancelled(async_redis, key_prefix) -> None:
    """Once meta.cancel is set, a token write becomes the terminal cancelled event."""
    store = make_store(async_redis, key_prefix, "d1")
    c = await claim(store, "r")
    await store.append_many([token(store, "r", c, 0, 0, [1])], 0)
    await async_redis.hset(p.meta_key("r", key_prefix), "cancel", "1")
    assert await store.cancel_requested(["r", "other"]) == {"r"}
    assert await store.append_many([token(store, "r", c, 1, 1, [2])], 0) == ["cancelled"]
    events = await read_events(async_redis, key_prefix, "r")
    assert isinstance(events[-1], p.CancelledEvent) and events[-1].seq == 1
    assert await async_redis.hget(p.meta_key("r", key_prefix), "state") == b"cancelled"


async def test_expired_request_is_gone_and_not_recreated(async_redis, key_prefix) -> None:
    """A write for a request whose keys vanished answers gone and creates nothing."""
    store = make_store(async_redis, key_prefix, "d1")
    c = await claim(store, "r")
    await async_redis.delete(*store._keys("r"))
    assert await store.append_many([token(store, "r", c, 0, 0, [1])], 0) == ["gone"]
    assert await async_redis.exists(*store._keys("r")) == 0


async def test_queue_read_renew_release_and_autoclaim(async_redis, key_prefix) -> None:
    """Renewed entries stay put; released ones are taken over at once; acked ones vanish."""
    a, b = make_store(async_redis, key_prefix, "a"), make_store(async_redis, key_prefix, "b")
    await a.ensure_group()
    await a.ensure_group()  # BUSYGROUP is ignored
    ids = [await async_redis.xadd(a.queue_key, {"body": "{}"}) for _ in range(3)]
    got = await a.read_new(count=10, block_ms=10)
    assert [i for i, _ in got] == [i.decode() for i in ids]
    await asyncio.sleep(0.3)  # past b's lease of 200 ms
    assert await a.renew([got[0][0], "0-1"]) == 1
    await a.release([got[1][0]])
    claimed, deleted = await b.autoclaim(count=10)
    assert sorted(i for i, _ in claimed) == sorted([got[1][0], got[2][0]]) and deleted == []
    assert await a.own_pending_ids() == {got[0][0]}
    assert [i for i, _ in await a.read_own_pending()] == [got[0][0]]
    await a.ack([got[0][0]])
    assert await a.own_pending_ids() == set()
    assert await async_redis.xlen(a.queue_key) == 2


async def test_dead_letter_keeps_raw_fields(async_redis, key_prefix) -> None:
    """A dead letter records entry id, reason and the raw (lossy-decoded) fields."""
    store = make_store(async_redis, key_prefix, "d1")
    await store.dead_letter("1-0", None, "no id", {b"\xff": b"\xfe"})
    [(_, fields)] = await async_redis.xrange(store.dlq_key)
    assert fields[b"entry_id"] == b"1-0" and fields[b"reason"] == b"no id"
    assert b"id" not in fields and "\ufffd" in fields[b"fields"].decode()


async def test_heartbeat_registers_and_unregisters(async_redis, key_prefix) -> None:
    """The heartbeat key carries a TTL and the daemon shows in the ZSET until unregistered."""
    store = make_store(async_redis, key_prefix, "d1")
    beat = p.Heartbeat("d1", "m", "cpu", "q", 1, 0, 0, 0, 10, 0.0, None, 5)
    await store.heartbeat(beat, ttl_ms=5000, now_ms=123)
    assert 0 < await async_redis.pttl(p.daemon_key("d1", key_prefix)) <= 5000
    assert await async_redis.zscore(p.daemons_key(key_prefix), "d1") == 123
    await store.unregister()
    assert await async_redis.exists(p.daemon_key("d1", key_prefix)) == 0


@pytest.mark.parametrize("n", [1, 40])
async def test_pipeline_of_many_requests(async_redis, key_prefix, n: int) -> None:
    """One pipeline can carry writes for many requests; each is applied independently."""
    store = make_store(async_redis, key_prefix, "d1")
    claims = [await claim(store, f"r{i}", entry_id=f"{i + 1}-0") for i in range(n)]
    ops = [token(store, f"r{i}", c, 0, 0, [i]) for i, c in enumerate(claims)]
    assert await store.append_many(ops, 0) == ["ok"] * n


async def test_batched_scripts_reload_after_redis_forgets_them(private_redis) -> None:
    """claim_many and append_many send bare EVALSHA; after SCRIPT FLUSH (as after a restart)
    they load the script and rerun exactly the calls that did not run: one claim per request,
    every event once, in order."""
    server = private_redis()
    client = aioredis.Redis.from_url(server.url)
    try:
        store = make_store(client, "pfx", "d1")
        await client.script_flush()
        claims = await store.claim_many(
            [ClaimRequest(f"r{i}", f"{i + 1}-0", 1, TTL_MS) for i in range(3)],
            now_ms=1, max_attempts=3)
        assert [(c.status, c.epoch) for c in claims] == [("ok", 1)] * 3
        await client.script_flush()
        ops = [token(store, f"r{i}", claims[i], seq, seq, [seq]) for i in range(3)
               for seq in range(2)]
        assert await store.append_many(ops, now_ms=2) == ["ok"] * 6
        for i in range(3):
            events = await read_events(client, "pfx", f"r{i}")
            assert [e.ids for e in events] == [[0], [1]]
    finally:
        await client.aclose()
