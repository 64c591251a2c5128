"""The one place where the engine host imports the engine (and with it torch): called inside the
engine process, or in the daemon's engine thread when the engine runs in-process."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from helix_daemon.engine.config import EngineConfig

if TYPE_CHECKING:
    from helix_daemon.engine.engine import Engine


def load_engine(config: EngineConfig) -> Engine:
    """Load the model named by the config (slow: run it off the event loop)."""
    from helix_daemon.engine.engine import Engine

    # A spawned engine process starts with no logging set up; without this its INFO lines (a
    # .gguf conversion, a cache hit) would be dropped. A no-op where the daemon configured it.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return Engine.from_config(config)
