"""OpenAI requests to Helix request bodies, and Helix results to OpenAI responses (I/O-free).

One OpenAI request becomes one queue entry per choice: ``n`` per prompt (a completions request
may carry several prompts). Choice ``i`` of a seeded request gets ``seed + i`` so that its ``n``
samples differ, as OpenAI's do, and stay reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from helix_daemon.gateway.errors import invalid
from helix_daemon.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    Request,
)
from helix_daemon.wire.protocol import Usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and Helix's) default for /v1/completions
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters copied as they are when given (absent ones keep the daemon's defaults).
_PASSED = ("temperature", "top_p", "top_k", "min_p", "ignore_eos", "stop_token_ids", "priority",
           "regex", "grammar")


@dataclass(frozen=True)
class Choice:
    """One queue entry of a request: its OpenAI choice index, its prompt's index, its body."""

    index: int
    prompt_index: int
    body: dict[str, Any]


def to_choices(req: Request, default_max_tokens: int, max_choices: int) -> list[Choice]:
    """The queue entries of ``req``; raise a 400 for what the gateway refuses."""
    prompts = _prompts(req)
    if req.n < 1 or len(prompts) * req.n > max_choices:
        raise invalid(f"n times the number of prompts must be between 1 and {max_choices}", "n")
    common = _params(req, default_max_tokens)
    choices: list[Choice] = []
    for prompt_index, prompt in enumerate(prompts):
        for j in range(req.n):
            body = {**prompt, **common}
            if req.seed is not None:
                body["seed"] = req.seed + j
            choices.append(Choice(len(choices), prompt_index, body))
    return choices


def _params(req: Request, default_max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(req, name) for name in _PASSED
                            if getattr(req, name) is not None}
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if req.chat_template_kwargs:
            body["chat_template_kwargs"] = req.chat_template_kwargs
        if req.response_format is not None:  # OpenAI's shapes are the protocol's own
            body["response_format"] = req.response_format
    else:
        max_tokens = req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    body["max_tokens"] = max_tokens
    if req.stop:
        body["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    return body


def _prompts(req: Request) -> list[dict[str, Any]]:
    if isinstance(req, ChatCompletionRequest):
        return [{"messages": [_message(i, m) for i, m in enumerate(req.messages)]}]
    return _completion_prompts(req)


def _completion_prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise invalid("the prompt is empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [{"prompt_token_ids": prompt}]
    return [{"prompt": item} if isinstance(item, str) else {"prompt_token_ids": item}
            for item in prompt]


def _message(i: int, message: ChatMessageIn) -> dict[str, str]:
    role = _ROLES.get(message.role)
    if role is None:
        raise invalid(f"messages[{i}].role {message.role!r} is not supported (use system, "
                      "developer, user or assistant)", f"messages.{i}.role")
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise invalid(f"messages[{i}].content: only text parts are supported",
                          f"messages.{i}.content")
        content = "\n".join(part.text or "" for part in content)
    return {"role": role, "content": content or ""}


# --- responses --------------------------------------------------------------------------------


class Shape:
    """The JSON objects of one response: chunks of a stream, or the whole completion."""

    def __init__(self, req: Request, request_id: str) -> None:
        self.is_chat = isinstance(req, ChatCompletionRequest)
        # The Helix request id of the first choice: a response can be traced to its entries.
        self.id = f"{'chatcmpl' if self.is_chat else 'cmpl'}-{request_id}"
        self.model = req.model
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _head(self, obj: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created,
                                "model": self.model, "system_fingerprint": None}
        return head

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        """One stream chunk: a text delta, or (``finish_reason``) the choice's last chunk."""
        if self.is_chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                      "finish_reason": finish_reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.is_chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def response(self, texts: list[tuple[str, str]], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole completion from each choice's (text, finish_reason), in choice order."""
        if self.is_chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text,
                                                "refusal": None},
                        "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(texts)]
            out = self._head("chat.completion")
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(texts)]
            out = self._head("text_completion")
        out["choices"] = choices
        out["usage"] = usage
        return out


class UsageTotal:
    """Usage of a request over its choices: each prompt counted once, every output counted."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._prompts_seen: set[int] = set()

    def add(self, choice: Choice, usage: Usage) -> None:
        self.completion_tokens += usage.completion_tokens
        if choice.prompt_index not in self._prompts_seen:
            self._prompts_seen.add(choice.prompt_index)
            self.prompt_tokens += usage.prompt_tokens
            # reported by daemons with prefix caching; older daemons leave it out
            self.cached_tokens += int(getattr(usage, "cached_tokens", 0) or 0)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
