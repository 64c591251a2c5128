"""Wire format: key names, request decoding and event round trips (no Redis needed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helix_daemon.wire import protocol as p
from scheduler.errors import InvalidRequestError


def test_keys_follow_the_documented_layout() -> None:
    """Key builders produce exactly the names in the protocol, hash tags included."""
    assert p.queue_key("default") == "helix:q:{default}"
    assert p.out_key("r1") == "helix:r:{r1}:out"
    assert p.meta_key("r1", "x") == "x:r:{r1}:meta"
    assert p.dlq_key("m") == "helix:dlq:{m}"
    assert p.daemon_key("h:default:0") == "helix:d:h:default:0"
    assert p.daemons_key() == "helix:daemons"
    assert p.cancel_channel() == "helix:cancel"


def test_documented_example_entry_decodes() -> None:
    """The redis-cli example of the docs (bytes as redis-py returns them) becomes a request."""
    fields = {b"v": b"1", b"id": b"r1",
              b"body": b'{"prompt":"Hello","max_tokens":8,"temperature":0}'}
    request = p.decode_request(fields, "1700000000000-0")
    assert request.request_id == "r1"
    params = p.to_request_params(request.body)
    assert params.max_tokens == 8 and params.sampling.is_greedy


def test_missing_id_defaults_to_the_entry_id() -> None:
    """Without an ``id`` field the entry id names the request."""
    request = p.decode_request({"body": '{"prompt_token_ids":[1,2]}'}, "5-1")
    assert request.request_id == "5-1" and request.body.prompt_token_ids == [1, 2]


@pytest.mark.parametrize("body", [
    b"not json", b'{"prompt": 5}', b'{"prompt":"a","bogus":1}', b'{"max_tokens":"8"}',
    b'{"max_tokens":8.5}', b"[]", b"\xff\xfe",
])
def test_undecodable_bodies_are_bad_entries_with_their_id(body: bytes) -> None:
    """Not JSON, wrong types or unknown fields: BadEntryError that still names the request."""
    with pytest.raises(p.BadEntryError) as info:
        p.decode_request({b"id": b"r9", b"body": body}, "1-0")
    assert info.value.request_id == "r9" and info.value.code == "bad_entry"


@pytest.mark.parametrize("fields", [
    {b"id": b"\xff\xff", b"body": b"{}"}, {b"id": b"", b"body": b"{}"},
    {b"id": b"a{b}", b"body": b"{}"}, {b"id": b"x" * 500, b"body": b"{}"},
])
def test_unreadable_ids_give_no_request_id(fields: dict[bytes, bytes]) -> None:
    """An id that is not UTF-8, empty, too long or holds braces cannot name a stream."""
    with pytest.raises(p.BadEntryError) as info:
        p.decode_request(fields, "1-0")
    assert info.value.request_id is None


def test_other_versions_and_huge_bodies_are_refused() -> None:
    """``v`` other than 1 and bodies over the size cap are bad entries."""
    with pytest.raises(p.BadEntryError, match="version"):
        p.decode_request({"v": "2", "body": "{}"}, "1-0")
    huge = json.dumps({"prompt": "x" * (p.MAX_BODY_BYTES + 1)})
    with pytest.raises(p.BadEntryError, match="larger"):
        p.decode_request({"body": huge}, "1-0")


@pytest.mark.parametrize("body", [
    {"max_tokens": -1, "prompt": "a"}, {"prompt": "a", "prompt_token_ids": [1]}, {},
    {"prompt": "a", "temperature": -0.5}, {"prompt": "a", "top_p": 0},
    {"prompt": "a", "timeout_s": 0}, {"prompt": "a", "stop": [""]},
])
def test_semantically_bad_bodies_are_invalid_requests(body: dict) -> None:
    """Well-typed bodies with impossible values fail with InvalidRequestError (invalid_request)."""
    request = p.decode_request({"body": json.dumps(body)}, "1-0")
    with pytest.raises(InvalidRequestError):
        p.to_request_params(request.body)


def test_encode_request_fields_round_trip() -> None:
    """What a client XADDs decodes back to the same body and id."""
    body = p.RequestBody(prompt="hi", max_tokens=3, stop=["\n"], seed=7)
    fields = p.encode_request_fields(body, "abc")
    assert fields["v"] == "1"
    assert p.decode_request(fields, "9-9") == p.Request("abc", body)


events = st.one_of(
    st.builds(p.TokenEvent, seq=st.integers(0, 10**6), att=st.integers(1, 99),
              off=st.integers(0, 10**6), text=st.text(), ids=st.lists(st.integers(0, 2**31))),
    st.builds(p.ErrorEvent, seq=st.integers(0), att=st.integers(1), code=st.just("timeout"),
              message=st.text()),
    st.builds(p.CancelledEvent, seq=st.integers(0), att=st.integers(1), reason=st.text()),
    st.builds(p.DoneEvent, seq=st.integers(0), att=st.integers(1), finish_reason=st.just("stop"),
              usage=st.builds(p.Usage, st.integers(0), st.integers(0)),
              timings=st.builds(p.Timings, st.floats(0, 1e6), st.none(), st.floats(0, 1e6),
                                st.none(), st.integers(1, 9))),
)


@given(events)
def test_events_round_trip_through_flat_fields(event: p.Event) -> None:
    """Every event encodes to flat strings and decodes (from bytes, as Redis returns) unchanged."""
    fields = p.encode_event(event)
    assert all(isinstance(v, str) for v in fields.values())
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    decoded = p.decode_event(raw)
    assert decoded == event
    assert p.is_terminal(decoded) == (fields["type"] in p.TERMINAL_TYPES)


def test_malformed_events_raise_value_error() -> None:
    """Readers get ValueError, not a crash, for unknown types or missing fields."""
    with pytest.raises(ValueError):
        p.decode_event({"type": "nope"})
    with pytest.raises(ValueError):
        p.decode_event({"type": "token", "seq": "0"})
