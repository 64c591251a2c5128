"""The request bodies of ``/v1/chat/completions`` and ``/v1/completions`` (pydantic, so FastAPI
documents them at ``/docs``).

Unknown parameters are refused (400), as OpenAI does. Parameters that exist in OpenAI's API but
that Helix cannot honour are accepted only at their neutral value (``check_supported``): a client
that asks for log probabilities, tools or penalties gets a clear 400, never a silently different
answer. Helix's own sampling knobs ride along as vLLM's do (the SDK's ``extra_body``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helix_daemon.gateway.errors import APIError, invalid


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # sent by some clients; Helix reports usage at the end


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and dropped: chat templates have no place for it


class _Sampling(BaseModel):
    """Parameters shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted; Helix keeps no per-user state
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Helix (and vLLM) extras, the SDK's extra_body
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: int | None = None
    regex: str | None = None  # structured output: a regular expression or a Lark grammar
    grammar: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


Request = ChatCompletionRequest | CompletionRequest
Endpoint = Literal["chat", "completions"]

_NEUTRAL_SAMPLING: tuple[tuple[str, object], ...] = (
    ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("logit_bias", {}))


def check_supported(req: Request) -> None:
    """Raise a 400 for a parameter Helix cannot honour (see the module docstring)."""
    if req.logprobs or getattr(req, "top_logprobs", None) is not None:
        raise invalid("logprobs are not supported by Helix: its result streams carry token ids "
                      "and text, not log probabilities", "logprobs")
    for name, neutral in _NEUTRAL_SAMPLING:
        if getattr(req, name) not in (None, neutral):
            raise invalid(f"{name} is not supported by Helix", name)
    if isinstance(req, ChatCompletionRequest):
        _check_chat(req)
    else:
        _check_completion(req)


def _check_chat(req: ChatCompletionRequest) -> None:
    if req.tools or req.functions or req.tool_choice not in (None, "none") \
            or req.function_call not in (None, "none"):
        raise invalid("tools and function calling are not supported by Helix", "tools")
    # response_format's shape (text, json_object, json_schema) is checked as the daemon will,
    # by the protocol's own validation of the body it becomes


def _check_completion(req: CompletionRequest) -> None:
    if req.echo:
        raise invalid("echo is not supported by Helix", "echo")
    if req.suffix:
        raise invalid("suffix is not supported by Helix", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of other than n is not supported by Helix", "best_of")


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 naming the first invalid parameter of a pydantic validation error."""
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request body")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value" if param else None)
