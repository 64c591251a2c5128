"""Running a gateway: ``serve`` (blocking, for ``helix gateway``) on uvicorn."""

from __future__ import annotations

import uvicorn

from helix_daemon.gateway.app import create_app
from helix_daemon.gateway.config import GatewayConfig


def serve(config: GatewayConfig, host: str, port: int, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: open streams get its graceful timeout)."""
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=host, port=port, log_level=log_level.lower(),
        timeout_graceful_shutdown=10, server_header=False,
        # Keep-alive connections of a pool of SDK clients outlive a short idle time.
        timeout_keep_alive=30, backlog=4096))
    server.run()
    return 0
