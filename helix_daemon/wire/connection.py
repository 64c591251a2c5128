"""Asyncio Redis clients whose commands are packed by hiredis, when it is installed.

redis-py's blocking connection packs commands with hiredis' C packer (``HiredisRespSerializer``);
its asyncio connection always packs in Python. The daemon's appends carry about 20 arguments
per token event, and under a burst the Python packer took a quarter of the event loop's time
(66 us per event, measured), time the loop then holds the GIL that the engine thread needs.
The bytes on the wire are the same either way.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from redis.connection import HiredisRespSerializer

    _SERIALIZER = HiredisRespSerializer()

    class HiredisPackedConnection(aioredis.Connection):
        """An asyncio TCP connection that packs with hiredis (the parser already does)."""

        def pack_command(self, *args: Any) -> list[bytes]:
            return _SERIALIZER.pack(*args)

    class HiredisPackedUnixConnection(aioredis.UnixDomainSocketConnection):
        """The same over a Unix socket (``unix://`` URLs: a daemon on Redis's own machine)."""

        def pack_command(self, *args: Any) -> list[bytes]:
            return _SERIALIZER.pack(*args)


def async_redis(url: str, **kwargs: Any) -> aioredis.Redis:
    """``redis.asyncio.Redis.from_url`` with the faster packer for ``redis://`` and ``unix://``."""
    if HIREDIS_AVAILABLE and url.startswith("redis://"):
        kwargs.setdefault("connection_class", HiredisPackedConnection)
    client = aioredis.Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    if HIREDIS_AVAILABLE and pool.connection_class is aioredis.UnixDomainSocketConnection:
        # from_url lets a unix:// URL's own class win over a connection_class argument
        pool.connection_class = HiredisPackedUnixConnection
    return client
