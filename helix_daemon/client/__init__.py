"""Clients of the Helix Redis protocol v1 (docs/protocol.md): ``AsyncHelixClient`` (asyncio) and
``HelixClient`` (blocking), sharing the I/O-free core in ``core.py``."""

from helix_daemon.client.aio import AsyncHelixClient
from helix_daemon.client.core import RequestResult, StreamGapError, build_request
from helix_daemon.client.sync import HelixClient

__all__ = ["AsyncHelixClient", "HelixClient", "RequestResult", "StreamGapError", "build_request"]
