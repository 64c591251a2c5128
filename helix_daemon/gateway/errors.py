"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is raised anywhere in the gateway and turned into a JSON response by the app's
handler; ``from_event`` maps a request's terminal ``error``/``cancelled`` event to one.
"""

from __future__ import annotations

from typing import Any

from helix_daemon.wire.protocol import CancelledEvent, ErrorEvent

# The HTTP status of each error code a daemon writes on a result stream.
_EVENT_STATUS = {"invalid_request": 400, "timeout": 504}


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    """400: a parameter the gateway or the wire refuses."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def from_event(event: ErrorEvent | CancelledEvent) -> APIError:
    """The HTTP error of a request that ended with an ``error`` or ``cancelled`` event."""
    if isinstance(event, CancelledEvent):
        return APIError(500, f"the request was cancelled: {event.reason}", "server_error",
                        code="cancelled")
    status = _EVENT_STATUS.get(event.code, 500)
    kind = "invalid_request_error" if status == 400 else "server_error"
    return APIError(status, event.message, kind, code=event.code)
