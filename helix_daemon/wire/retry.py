"""Small shared pieces of the daemon's Redis loops: clock, backoff, what counts as an outage."""

from __future__ import annotations

import random
import time

from redis.exceptions import RedisError

# Errors after which a loop waits and tries again (Redis restarting, network down, timeouts).
REDIS_ERRORS = (RedisError, OSError)
_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_jitter = random.Random()  # private: jitter must not disturb (or be seeded by) anyone's global RNG


def now_ms() -> int:
    return int(time.time() * 1000)


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures (jittered, capped at ~2 s)."""
    base = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
    return base * _jitter.uniform(0.8, 1.2)


def jittered(seconds: float) -> float:
    """``seconds`` +-20 %, so daemons started together do not poll in lockstep."""
    return seconds * _jitter.uniform(0.8, 1.2)
