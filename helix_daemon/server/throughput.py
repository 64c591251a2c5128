"""The counters a daemon's heartbeat reports: tokens generated since the last beat, and the
engine's running totals of draft tokens proposed and accepted."""

from __future__ import annotations

import time


class ThroughputWindow:
    """Tokens counted as they are applied; drafts as the engine reports its totals."""

    def __init__(self) -> None:
        self._num_tokens = 0  # generated since _start (the last heartbeat)
        self._start = time.monotonic()
        self._num_proposed = 0  # engine totals at its latest step
        self._num_accepted = 0

    def add_tokens(self, num_tokens: int) -> None:
        self._num_tokens += num_tokens

    def observe_drafts(self, num_proposed: int, num_accepted: int) -> tuple[int, int]:
        """Take the engine's draft totals; return what was proposed and accepted since the
        last call."""
        delta = (num_proposed - self._num_proposed, num_accepted - self._num_accepted)
        self._num_proposed, self._num_accepted = num_proposed, num_accepted
        return delta

    def close(self) -> float:
        """Tokens per second since the window opened; a new window opens now."""
        now = time.monotonic()
        rate = self._num_tokens / max(now - self._start, 1e-3)
        self._num_tokens, self._start = 0, now
        return rate

    @property
    def acceptance_rate(self) -> float | None:
        """Draft tokens accepted over proposed, over the engine's life (None: none drafted)."""
        return self._num_accepted / self._num_proposed if self._num_proposed else None
