"""A real daemon (tiny model, real Redis) running on its own event loop in a background thread.

Client and CLI tests call blocking code (``HelixClient``, ``cli.main`` with its own
``asyncio.run``), so the daemon cannot share their loop; a thread with a private loop keeps the
whole stack in one process without mocking anything.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import redis

from helix_daemon.wire import protocol as p


class LiveDaemon:
    """Start with ``start()``; ``stop()`` takes the graceful SIGTERM path (drain, unregister)."""

    def __init__(self, config: Any, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._daemon: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="live-daemon", daemon=True)
        self.exit_code: int | None = None

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from helix_daemon.server.daemon import Daemon
        from helix_daemon.server.run import redis_client

        self._loop = asyncio.get_running_loop()
        client = redis_client(self.config.redis_url)
        self._daemon = Daemon(self.config, self.engine, client)
        self._ready.set()
        try:
            self.exit_code = await self._daemon.run()
        finally:
            await client.aclose()

    def start(self, timeout_s: float = 30.0) -> LiveDaemon:
        self._thread.start()
        self._ready.wait(timeout_s)
        beat = p.daemon_key(self.config.daemon_id, self.config.key_prefix)
        client = redis.Redis.from_url(self.config.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while not client.exists(beat):  # registered: group created, loops running
                if time.monotonic() > deadline:
                    raise TimeoutError("daemon sent no heartbeat")
                time.sleep(0.02)
        finally:
            client.close()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._daemon is not None:
            self._loop.call_soon_threadsafe(self._daemon.request_stop)
        self._thread.join(timeout_s)


def start_live_daemon(model: str, redis_url: str, prefix: str, **overrides: Any) -> LiveDaemon:
    """Load ``model`` on CPU with a small KV pool and serve the ``default`` queue of ``prefix``."""
    from helix_daemon.config import DaemonConfig
    from helix_daemon.engine_host.load import load_engine
    from helix_daemon.logs import configure_logging

    # Before the daemon binds its logger: its lines must go to stderr, never into the stdout
    # the CLI tests parse.
    configure_logging(json=True, level="WARNING")
    settings: dict[str, Any] = dict(model=model, redis_url=redis_url, key_prefix=prefix,
                                    daemon_id=f"{prefix}-d0", device="cpu", dtype="float32",
                                    num_kv_blocks=256, max_num_seqs=16,
                                    heartbeat_interval_s=0.2, drain_timeout_s=5.0)
    settings.update(overrides)
    config = DaemonConfig(**settings)
    return LiveDaemon(config, load_engine(config.engine_config())).start()
