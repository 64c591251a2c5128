"""Structured logging for the daemon and CLI: JSON lines in production, colours in a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json: bool | None = None, level: str | int = "INFO") -> None:
    """Route structlog (and stdlib logging) through one renderer.

    ``json=None`` picks JSON when stderr is not a TTY, which is how the daemon runs under a
    supervisor; a person at a terminal gets the console renderer. Context bound with
    ``structlog.contextvars.bind_contextvars(request_id=..., daemon_id=...)`` is merged into
    every event logged from the same task or thread.
    """
    use_json = (not sys.stderr.isatty()) if json is None else json
    numeric_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging; keep them at the same threshold.
    logging.basicConfig(level=numeric_level, format="%(levelname)s %(name)s: %(message)s")


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # Logs go to stderr so CLI output on stdout (ids, JSONL) stays machine-readable; the stream
    # is looked up per logger because pytest and the CLI may swap sys.stderr after import.
    return structlog.PrintLogger(sys.stderr)
