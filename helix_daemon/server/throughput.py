"""The heartbeat's throughput: tokens generated since the last beat."""

from __future__ import annotations

import time


class ThroughputWindow:
    """Tokens counted as they are applied, per window between heartbeats."""

    def __init__(self) -> None:
        self._num_tokens = 0  # generated since _start (the last heartbeat)
        self._start = time.monotonic()

    def add_tokens(self, num_tokens: int) -> None:
        self._num_tokens += num_tokens

    def close(self) -> float:
        """Tokens per second since the window opened; a new window opens now."""
        now = time.monotonic()
        rate = self._num_tokens / max(now - self._start, 1e-3)
        self._num_tokens, self._start = 0, now
        return rate
