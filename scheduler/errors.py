"""Typed errors a request can fail with; the daemon maps ``code`` onto the wire.

    HelixRequestError
     └── InvalidRequestError   (bad parameters: the request can never run)
"""

from __future__ import annotations


class HelixRequestError(Exception):
    """Base of every error that belongs to one request and not to the engine."""

    code = "request_error"


class InvalidRequestError(HelixRequestError, ValueError):
    """The request is malformed or can never be served (too long, bad sampling values...)."""

    code = "invalid_request"
