"""Batch input lines in (``{"custom_id", "method", "url", "body"}``) and OpenAI's output lines
out (``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pydantic

from helix_daemon.client import RequestResult, build_request
from helix_daemon.gateway.errors import APIError, from_event, invalid
from helix_daemon.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Request,
    check_supported,
    validation_error,
)
from helix_daemon.gateway.translate import Choice, Shape, UsageTotal, to_choices
from helix_daemon.wire.protocol import CancelledEvent, ErrorEvent, Usage
from scheduler.errors import InvalidRequestError

ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
BATCH_PRIORITY = 10  # lower runs first: interactive requests (0) go ahead of batch lines


class BatchFileError(ValueError):
    """The input file as a whole cannot be run (the batch fails during validation)."""


@dataclass
class Line:
    """One input line: its request (None when invalid) or the error it answers with."""

    custom_id: str
    request_id: str
    request: Request | None
    choice: Choice | None
    error: APIError | None = None


def request_id_of(batch_id: str, custom_id: str) -> str:
    """The queue request id of a line: the same on every retry, safe inside a hash tag."""
    return f"{batch_id}-{hashlib.sha256(custom_id.encode()).hexdigest()[:32]}"


def parse_input(content: bytes, endpoint: str, batch_id: str,
                default_max_tokens: int) -> list[Line]:
    """The lines of a batch file; raise BatchFileError for a file that cannot run at all."""
    lines: list[Line] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as e:
            raise BatchFileError(f"line {number} is not JSON: {e}") from None
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            raise BatchFileError(f"line {number} has no string custom_id")
        custom_id = item["custom_id"]
        if custom_id in seen:
            raise BatchFileError(f"line {number}: custom_id {custom_id!r} is not unique")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST" or item.get("url") != endpoint:
            raise BatchFileError(f"line {number}: every line must be POST {endpoint}")
        lines.append(to_line(custom_id, request_id_of(batch_id, custom_id), endpoint,
                             item.get("body"), default_max_tokens))
    if not lines:
        raise BatchFileError("the input file has no requests")
    return lines


def to_line(custom_id: str, request_id: str, endpoint: str, body: Any,
            default_max_tokens: int) -> Line:
    """One line's request, validated as the HTTP endpoint would, or the error it answers."""
    model = ENDPOINTS.get(endpoint)
    if model is None:
        return Line(custom_id, request_id, None, None,
                    invalid(f"url must be one of {', '.join(ENDPOINTS)}", "url"))
    try:
        request = model.model_validate(body)
    except pydantic.ValidationError as e:
        return Line(custom_id, request_id, None, None, validation_error(list(e.errors())))
    try:
        if request.stream or request.n != 1:
            raise invalid("batch lines take neither stream nor n other than 1")
        check_supported(request)
        choice = to_choices(request, default_max_tokens, 1)[0]
        choice.body["priority"] = max(BATCH_PRIORITY, choice.body.get("priority", 0))
        build_request(**choice.body)
    except APIError as e:
        return Line(custom_id, request_id, None, None, e)
    except InvalidRequestError as e:
        return Line(custom_id, request_id, None, None, invalid(str(e)))
    return Line(custom_id, request_id, request, choice)


def output_line(line: Line, result: RequestResult) -> tuple[bool, str]:
    """(ok, JSON line) for a finished request: a completion, or its error's body."""
    assert line.request is not None and line.choice is not None
    if result.ok and result.usage is not None:
        usage = UsageTotal()
        usage.add(line.choice, Usage(**{k: v for k, v in result.usage.items()
                                        if k in Usage.__struct_fields__}))
        body = Shape(line.request, line.request_id).response(
            [(result.text, result.finish_reason or "stop")], usage.to_dict())
        return True, _line_json(line, 200, body)
    event: ErrorEvent | CancelledEvent = (
        CancelledEvent(0, 0, result.error_message or "cancelled") if result.state == "cancelled"
        else ErrorEvent(0, 0, result.error_code or "engine_error", result.error_message or ""))
    error = from_event(event)
    return False, _line_json(line, error.status, error.body())


def error_line(line: Line, status: int, body: dict[str, Any]) -> str:
    return _line_json(line, status, body)


def expired_line(line: Line) -> str:
    """The answer of a line the completion window ended first, as OpenAI writes it: no
    response, the ``batch_expired`` error."""
    return json.dumps({"id": f"batch_req_{line.request_id}", "custom_id": line.custom_id,
                       "response": None, "error": {
                           "code": "batch_expired", "message": "This request could not be "
                           "executed before the completion window expired."}},
                      ensure_ascii=False)


def _line_json(line: Line, status: int, body: dict[str, Any]) -> str:
    return json.dumps({"id": f"batch_req_{line.request_id}", "custom_id": line.custom_id,
                       "response": {"status_code": status, "request_id": line.request_id,
                                    "body": body}, "error": None}, ensure_ascii=False)
