"""Running a daemon: its Redis connection, a blocking ``serve`` for the CLI and
``python -m helix_daemon.daemon``, and ``run_in_background`` for programs that embed one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal

import redis.asyncio as aioredis

from helix_daemon.config import DaemonConfig
from helix_daemon.engine_host.protocols import StepEngine
from helix_daemon.server.daemon import Daemon
from helix_daemon.wire.connection import async_redis


def redis_client(url: str) -> aioredis.Redis:
    # The socket timeout must exceed the XREADGROUP block time; short connect timeouts make a
    # restarted Redis come back quickly.
    return async_redis(url, socket_timeout=5.0, socket_connect_timeout=2.0,
                       health_check_interval=10)


async def run_in_background(daemon: Daemon) -> asyncio.Task[int]:
    """Start ``daemon.run()`` as a task and return it once the daemon is serving; raise
    RuntimeError if it ended first (its model did not load: the daemon logged why)."""
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        raise RuntimeError(f"the daemon did not start (exit code {task.result()})")
    return task


async def run_daemon(config: DaemonConfig, engine: StepEngine | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``Daemon.request_stop``); return the exit code.

    Without an ``engine``, the daemon loads ``config.model`` (see ``Daemon._start_engine``)."""
    client = redis_client(config.redis_url)
    daemon = Daemon(config, engine, client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, daemon.request_stop)
    try:
        return await daemon.run()
    finally:
        await client.aclose()


def serve(config: DaemonConfig) -> int:
    """Blocking entry point for the CLI: configure logging, resolve Redis, run the daemon."""
    from helix_daemon.logs import configure_logging
    from helix_daemon.wire.embedded import resolve_redis_url

    configure_logging(config.log_json)
    url, close = resolve_redis_url(config.redis_url)
    try:
        return asyncio.run(run_daemon(dataclasses.replace(config, redis_url=url)))
    finally:
        close()
