"""Shared fixtures: the shared Redis (per-test key prefixes) and private redis-server processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

# the real SmolLM2 GGUF fixtures, session-scoped and shared by test_gguf.py and test_chat.py
from tests.smollm2 import cache_dir, first_resolve, gguf, hf_from_gguf  # noqa: F401

# The server `make test` checked (or started): the Makefile exports REDIS_URL, so the tests use
# the same one; unset (plain `pytest`), the local default.
SHARED_REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Remove every key a test created (never FLUSHALL: the server is shared)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis every test uses (``REDIS_URL``, default 127.0.0.1:6379/0)."""
    return SHARED_REDIS_URL


def _unique_prefix(tag: str = "") -> Iterator[str]:
    """A unique key prefix on the shared Redis; its keys are deleted afterwards."""
    prefix = f"helixtest-{tag}{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A unique key prefix for one test."""
    yield from _unique_prefix()


@pytest.fixture(scope="module")
def module_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique key prefix shared by one test module (e.g. with a module-scoped daemon)."""
    yield from _unique_prefix(request.module.__name__.rsplit(".", 1)[-1] + "-")


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


class RedisServer:
    """A private ``redis-server`` on a free port with AOF on, so it can be restarted safely."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Factory of private redis-servers (for tests that stop or restart Redis)."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}")
        server.workdir.mkdir()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (and tokenizer) saved once per session; long context for long jobs."""
    from helix_daemon.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", max_positions=4096)
