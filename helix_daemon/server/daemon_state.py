"""The state a ``Daemon`` shares with its mixins, declared once for type checkers and readers.

``Daemon`` sets every attribute in its ``__init__``; ``StreamWriterMixin`` and ``UpkeepMixin``
inherit these declarations instead of repeating them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from helix_daemon.config import DaemonConfig
from helix_daemon.engine.outputs import EngineStats
from helix_daemon.engine_host.protocols import EngineHandle
from helix_daemon.server.attempt import Attempt
from helix_daemon.server.metrics import DaemonMetrics
from helix_daemon.wire.store import Store


class DaemonState:
    config: DaemonConfig
    store: Store
    log: Any
    metrics: DaemonMetrics
    active: dict[str, Attempt]  # request id -> the attempt this daemon runs
    _by_engine_id: dict[str, Attempt]
    _acks: list[str]  # entry ids whose terminal event is durable, to XACK
    _flush_needed: asyncio.Event
    _slots_freed: asyncio.Event  # set whenever free_slots() may have grown
    _closing: asyncio.Event  # set when the background loops are to end
    _worker: EngineHandle | None
    _engine_stats: EngineStats | None  # from the latest StepResult that carried stats

    @property
    def engine_stats(self) -> EngineStats | None:
        """The engine's ``EngineStats`` after its latest step (None before it started)."""
        return self._engine_stats
