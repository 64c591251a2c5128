"""The ``messages`` prompt form on the wire: exactly one prompt form; bad messages are
``invalid_request`` (the request gets an error event), malformed JSON shapes ``bad_entry``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helix_daemon.client.core import build_request
from helix_daemon.engine.chat import ChatPrompt
from helix_daemon.server.admission import _prompt
from helix_daemon.wire import protocol as p
from scheduler.errors import InvalidRequestError

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _params(body: dict) -> None:
    p.to_request_params(p.decode_request({"body": json.dumps(body)}, "1-0").body)


def test_messages_decode_and_become_a_chat_prompt() -> None:
    """A valid ``messages`` body passes validation and reaches the engine as a ChatPrompt with
    its template kwargs, the messages as plain dicts."""
    body = p.decode_request({"body": json.dumps(
        {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": False}})}, "1-0").body
    p.to_request_params(body)
    assert _prompt(body) == ChatPrompt(HELLO, {"enable_thinking": False})


@given(st.lists(st.sampled_from(["prompt", "prompt_token_ids", "messages"]), unique=True)
       .filter(lambda forms: len(forms) != 1))
def test_exactly_one_prompt_form(forms: list[str]) -> None:
    """None, two or all three of the prompt forms: invalid_request."""
    values = {"prompt": "a", "prompt_token_ids": [1], "messages": HELLO}
    with pytest.raises(InvalidRequestError, match="exactly one"):
        _params({form: values[form] for form in forms})


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "User", "content": "x"}]},
    {"messages": [{"role": 1, "content": "x"}]},
    {"messages": [{"role": "user", "content": ["x"]}]},
    {"messages": [{"role": "user", "content": None}]},
    {"messages": [{"role": "user", "content": {"text": "x"}}]},
    {"prompt": "a", "chat_template_kwargs": {"x": 1}},
])
def test_bad_messages_are_invalid_requests(body: dict) -> None:
    """An empty list, a role outside system/user/assistant, non-string content, or template
    kwargs without messages: well-formed JSON with impossible values, so invalid_request."""
    with pytest.raises(InvalidRequestError):
        _params(body)


@given(st.text(min_size=1).filter(lambda r: r not in p.CHAT_ROLES))
def test_any_other_role_is_refused(role: str) -> None:
    """Only the three chat roles are accepted, whatever else a client sends."""
    with pytest.raises(InvalidRequestError, match="role"):
        _params({"messages": [{"role": role, "content": "x"}]})


@pytest.mark.parametrize("body", [
    b'{"messages": "hi"}', b'{"messages": ["hi"]}', b'{"messages": [{"role": "user"}]}',
    b'{"messages": [{"role": "user", "content": "x", "name": "a"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}',
])
def test_malformed_messages_are_bad_entries(body: bytes) -> None:
    """Shapes the schema cannot read (not a list of {role, content} objects, an extra field, kwargs
    that are not an object) are bad entries that still name the request."""
    with pytest.raises(p.BadEntryError) as info:
        p.decode_request({b"id": b"r9", b"body": body}, "1-0")
    assert info.value.request_id == "r9" and info.value.code == "bad_entry"


def test_messages_round_trip_through_encode_body() -> None:
    """A client's body with messages encodes to JSON the daemon decodes back unchanged."""
    body = p.RequestBody(messages=[p.ChatMessage("user", "Hi")],
                         chat_template_kwargs={"k": True})
    assert p.decode_request(p.encode_request_fields(body, "r1"), "1-0").body == body


def test_client_build_request_validates_messages_like_the_daemon() -> None:
    """``build_request(messages=...)`` gives the body the daemon decodes, and refuses what the
    daemon would answer with invalid_request: an empty list, a bad role, a second prompt form."""
    body = build_request(messages=HELLO, chat_template_kwargs={"k": 1}, max_tokens=4)
    assert body.messages == [p.ChatMessage(**m) for m in HELLO] and body.max_tokens == 4
    for bad in ({"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": HELLO, "prompt": "a"}, {"messages": [{"role": "user"}]}):
        with pytest.raises(InvalidRequestError):
            build_request(**bad)
