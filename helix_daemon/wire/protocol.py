"""Helix Redis protocol v1: key names, the request body, and the events of a result stream.

Everything a producer or a reader needs is flat strings in Redis so ``redis-cli`` works:

Submit (any client)::

    XADD helix:q:{default} * v 1 id r1 body '{"prompt":"Hello","max_tokens":8,"temperature":0}'

Entry fields: ``v`` (``1``; a missing ``v`` is read as 1, any other value is refused as
``bad_entry``), ``id`` (optional request id, default = the entry id; at most 200 printable
characters, no ``{`` or ``}`` since it sits inside a hash tag), ``body`` (JSON, see
``RequestBody``). Other entry fields are ignored (room for later versions).

Read: ``XREAD BLOCK 5000 STREAMS helix:r:{r1}:out 0`` and follow the entry ids. Every event has
``seq`` (gap-free from 0 across attempts), ``att`` (the epoch that wrote it) and ``type``
(``token`` | ``done`` | ``error`` | ``cancelled``); the last event is always the only terminal one.
A reader that reconnects skips events whose ``seq`` it already has.

Cancel: ``HSET helix:r:{r1}:meta cancel 1`` then ``PUBLISH helix:cancel r1``. A request that is
still queued is cancelled when a daemon picks it up; a running one within one engine step.

Meta hash fields (read-only for clients except ``cancel``): ``state`` (queued | running | done |
error | cancelled), ``owner``, ``epoch``, ``attempts``, ``next_seq``, ``next_off``, ``cancel``,
``queue``, ``entry_id``, ``created_ms``, ``finished_ms``, ``finish_reason``, ``error_code``.
A client MAY create the meta hash itself with ``state queued`` (e.g. to cancel early); the daemon
treats a meta hash without ``epoch`` as never claimed.

Events, refined: a ``token`` event may carry text with an empty ``ids`` list (text the engine
held back, e.g. an incomplete UTF-8 sequence or a possible stop-string prefix, released later).
``done.usage.completion_tokens`` counts the whole output (all attempts); ``done.timings`` describe
the attempt that finished (``queue_wait_s``: enqueue to that attempt's claim; ``ttft_s``: claim to
its first token). Error ``message`` is at most 1000 characters.

Dead letters: ``reason`` starts with a code: ``bad_entry: ...`` (undecodable), ``poison: N
attempts``, ``trimmed: ...`` (the entry vanished from the queue while pending); ``daemon`` names
the daemon that wrote it.

Attempts: each claim of a request (first pick-up, takeover after a lease lapse, restart of the
same daemon, hand-back at shutdown) counts one attempt; a claim that would be attempt
``max_attempts + 1`` ends the request with ``error`` code ``poison`` and a dead-letter entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from scheduler.errors import InvalidRequestError
from scheduler.params import OutputConstraint, RequestParams, SamplingParams

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "helix"
DEFAULT_QUEUE = "default"
GROUP = "helix"  # the consumer group every daemon of a queue joins
DEFAULT_RESULT_TTL_S = 3600
MAX_BODY_BYTES = 1 << 20  # a body larger than 1 MiB is refused without parsing it
MAX_ID_CHARS = 200

# A stream entry's fields as redis-py returns them: bytes, or str on a decoding connection.
# (``Mapping`` is invariant in its keys, so each form is spelled out.)
EntryFields = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
DLQ_MAXLEN = 10_000
OUT_MAXLEN = 100_000  # runaway guard only: one event per engine step per request

TERMINAL_TYPES = frozenset({"done", "error", "cancelled"})
TERMINAL_STATES = frozenset({"done", "error", "cancelled"})
ErrorCode = Literal["invalid_request", "bad_entry", "poison", "timeout", "engine_error"]


# --- keys -------------------------------------------------------------------------------------


def queue_key(queue: str = DEFAULT_QUEUE, prefix: str = DEFAULT_PREFIX) -> str:
    """STREAM of requests for one served model."""
    return f"{prefix}:q:{{{queue}}}"


def out_key(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """STREAM of events of one request."""
    return f"{prefix}:r:{{{request_id}}}:out"


def meta_key(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """HASH with the state of one request (see the module docstring)."""
    return f"{prefix}:r:{{{request_id}}}:meta"


def dlq_key(queue: str = DEFAULT_QUEUE, prefix: str = DEFAULT_PREFIX) -> str:
    """STREAM of dead letters: ``entry_id``, ``id`` (if known), ``reason``, ``fields``."""
    return f"{prefix}:dlq:{{{queue}}}"


def daemon_key(daemon_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """STRING (JSON ``Heartbeat``) with a PX TTL, refreshed while the daemon lives."""
    return f"{prefix}:d:{daemon_id}"


def daemons_key(prefix: str = DEFAULT_PREFIX) -> str:
    """ZSET daemon_id -> last heartbeat in ms."""
    return f"{prefix}:daemons"


def cancel_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Pub/sub channel; the message is a request id. Only a nudge: ``meta.cancel`` is durable."""
    return f"{prefix}:cancel"


# --- request body ---------------------------------------------------------------------------


CHAT_ROLES = ("system", "user", "assistant")


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One message of OpenAI's chat shape. ``role`` and ``content`` are checked by
    ``to_request_params`` so a wrong value answers ``invalid_request``, not ``bad_entry``."""

    role: Any
    content: Any


class RequestBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The JSON ``body`` of a request entry. Exactly one of ``prompt``, ``prompt_token_ids`` and
    ``messages`` (rendered with the model's chat template, the generation prompt added)."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, with ``messages``
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    priority: int = 0
    timeout_s: float | None = None  # counted from the enqueue time (the entry id's milliseconds)
    num_speculative_tokens: int | None = None
    result_ttl_s: int | None = None
    prefix_caching: bool = True  # false: this request neither reuses nor offers cached blocks
    cache_salt: str | None = None  # only requests with the same salt share cached blocks
    # structured output, at most one: OpenAI's response_format (text, json_object, json_schema),
    # a regular expression, or a Lark grammar (llguidance's dialect)
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None


class BadEntryError(Exception):
    """An entry that cannot be turned into a request. ``request_id`` is None when unreadable."""

    def __init__(self, message: str, request_id: str | None, code: ErrorCode = "bad_entry"):
        super().__init__(message)
        self.request_id = request_id
        self.code: ErrorCode = code


class Request(msgspec.Struct, frozen=True):
    """A decoded entry: who it is and what it asks for."""

    request_id: str
    body: RequestBody


_body_decoder = msgspec.json.Decoder(RequestBody)
_body_encoder = msgspec.json.Encoder()


def encode_body(body: RequestBody) -> str:
    """Serialize a body the way a client puts it in the ``body`` field."""
    return _body_encoder.encode(body).decode()


def encode_request_fields(body: RequestBody, request_id: str | None = None) -> dict[str, str]:
    """The entry fields for ``XADD`` (``id`` omitted = the entry id becomes the request id)."""
    fields = {"v": str(PROTOCOL_VERSION), "body": encode_body(body)}
    if request_id is not None:
        check_request_id(request_id)
        fields["id"] = request_id
    return fields


def check_request_id(request_id: str) -> None:
    """Raise ValueError unless ``request_id`` is usable inside a key's hash tag."""
    if not 0 < len(request_id) <= MAX_ID_CHARS:
        raise ValueError(f"request id must have 1..{MAX_ID_CHARS} characters")
    if not request_id.isprintable() or "{" in request_id or "}" in request_id:
        raise ValueError("request id must be printable and contain no '{' or '}'")


def _text(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8")  # raises UnicodeDecodeError on garbage


def _str_fields(fields: EntryFields) -> dict[str, bytes | str]:
    # Field names that are not UTF-8 cannot be any field we know: drop them.
    out: dict[str, bytes | str] = {}
    for name, value in fields.items():
        try:
            out[_text(name) or ""] = value
        except UnicodeDecodeError:
            continue
    return out


def read_request_id(fields: EntryFields, entry_id: str) -> str | None:
    """The request id an entry names (default its entry id), or None when it is unusable."""
    raw = _str_fields(fields).get("id")
    try:
        request_id = entry_id if raw is None else _text(raw)
        check_request_id(request_id or "")
    except (UnicodeDecodeError, ValueError):
        return None
    return request_id


def decode_request(fields: EntryFields, entry_id: str) -> Request:
    """Decode one queue entry; raise BadEntryError (with the id when it is readable)."""
    request_id = read_request_id(fields, entry_id)
    if request_id is None:
        raise BadEntryError("missing or unreadable request id", None)
    named = _str_fields(fields)
    version = named.get("v", str(PROTOCOL_VERSION).encode())
    if _lossy(version) != str(PROTOCOL_VERSION):
        raise BadEntryError(f"unsupported protocol version {_lossy(version)!r}", request_id)
    raw_body = named.get("body")
    if raw_body is None:
        raise BadEntryError("entry has no 'body' field", request_id)
    if len(raw_body) > MAX_BODY_BYTES:
        raise BadEntryError(f"body larger than {MAX_BODY_BYTES} bytes", request_id)
    try:
        body = _body_decoder.decode(raw_body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadEntryError(f"body is not a valid request: {e}", request_id) from e
    return Request(request_id, body)


def _lossy(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def lossy_fields_json(fields: EntryFields) -> str:
    """The raw entry as JSON (bytes decoded with replacement) for a dead letter."""
    return json.dumps({_lossy(k): _lossy(v) for k, v in fields.items()}, ensure_ascii=False)


def to_request_params(body: RequestBody) -> RequestParams:
    """Build validated engine parameters; raise InvalidRequestError (-> ``invalid_request``)."""
    forms = (body.prompt, body.prompt_token_ids, body.messages)
    if sum(form is not None for form in forms) != 1:
        raise InvalidRequestError(
            "exactly one of 'prompt', 'prompt_token_ids' and 'messages' is required")
    if body.prompt == "" or body.prompt_token_ids == [] or body.messages == []:
        raise InvalidRequestError("the prompt is empty")
    _check_chat(body)
    if body.timeout_s is not None and not body.timeout_s > 0:
        raise InvalidRequestError("timeout_s must be > 0")
    if body.result_ttl_s is not None and body.result_ttl_s < 1:
        raise InvalidRequestError("result_ttl_s must be >= 1")
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                              min_p=body.min_p, seed=body.seed)
    params = RequestParams(max_tokens=body.max_tokens, sampling=sampling, stop=tuple(body.stop),
                           stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
                           priority=body.priority,
                           num_speculative_tokens=body.num_speculative_tokens,
                           prefix_caching=body.prefix_caching, cache_salt=body.cache_salt,
                           constraint=to_constraint(body))
    params.validate()
    return params


def to_constraint(body: RequestBody) -> OutputConstraint | None:
    """The output constraint ``body`` asks for (None: free text); raise InvalidRequestError for a
    malformed one. Whether a schema, regex or grammar compiles is the engine's to find out."""
    asked = [c for c in (_response_format(body.response_format),
                         _text_constraint("regex", body.regex),
                         _text_constraint("grammar", body.grammar)) if c is not None]
    if len(asked) > 1:
        raise InvalidRequestError(
            "at most one of response_format (json), 'regex' and 'grammar' may be given")
    return asked[0] if asked else None


def _text_constraint(kind: Literal["regex", "grammar"],
                     source: str | None) -> OutputConstraint | None:
    if source is None:
        return None
    if not source:
        raise InvalidRequestError(f"{kind} is empty")
    return OutputConstraint(kind, source)


def _response_format(fmt: dict[str, Any] | None) -> OutputConstraint | None:
    """OpenAI's shapes: ``{"type": "text"}``, ``{"type": "json_object"}`` and
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    kind = None if fmt is None else fmt.get("type")
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint("json_object")
    if kind != "json_schema":
        raise InvalidRequestError(
            "response_format.type must be text, json_object or json_schema")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format.json_schema.schema must be a JSON object")
    # the schema's key order is kept: it is the order the properties are generated in
    return OutputConstraint("json_schema", json.dumps(schema, separators=(",", ":")))


def _check_chat(body: RequestBody) -> None:
    if body.chat_template_kwargs is not None and body.messages is None:
        raise InvalidRequestError("chat_template_kwargs is only valid with 'messages'")
    for i, message in enumerate(body.messages or []):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")


# --- events -----------------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (this attempt)


class Timings(msgspec.Struct):
    queue_wait_s: float  # enqueue (entry id time) -> first claim of the current attempt
    ttft_s: float | None  # claim -> first token written by this attempt (None if it wrote none)
    tokens_per_s: float  # output tokens of this attempt / its generation time
    acceptance_rate: float | None  # accepted / proposed draft tokens (None: no speculation)
    attempts: int


class TokenEvent(msgspec.Struct, tag="token"):
    """Tokens of one engine step: ``off`` is the output offset of ``ids[0]``."""

    seq: int
    att: int
    off: int
    text: str
    ids: list[int]


class DoneEvent(msgspec.Struct, tag="done"):
    seq: int
    att: int
    finish_reason: str  # stop | length
    usage: Usage
    timings: Timings


class ErrorEvent(msgspec.Struct, tag="error"):
    seq: int
    att: int
    code: str
    message: str


class CancelledEvent(msgspec.Struct, tag="cancelled"):
    seq: int
    att: int
    reason: str


Event = TokenEvent | DoneEvent | ErrorEvent | CancelledEvent
_EVENT_TYPES: dict[str, type[Event]] = {
    "token": TokenEvent, "done": DoneEvent, "error": ErrorEvent, "cancelled": CancelledEvent}
_JSON_FIELDS = frozenset({"ids", "usage", "timings"})


def encode_event(event: Event) -> dict[str, str]:
    """Flat string fields for XADD: ``type`` first, JSON for ``ids``/``usage``/``timings``."""
    fields = {"type": str(event.__struct_config__.tag)}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if name in _JSON_FIELDS:
            fields[name] = msgspec.json.encode(value).decode()
        else:
            fields[name] = str(value)
    return fields


def decode_event(fields: EntryFields) -> Event:
    """Parse an out-stream entry (str or bytes fields); raise ValueError when malformed."""
    named = {_lossy(k): _lossy(v) for k, v in fields.items()}
    cls = _EVENT_TYPES.get(named.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown event type {named.get('type')!r}")
    data: dict[str, object] = {}
    for name in cls.__struct_fields__:
        if name not in named:
            raise ValueError(f"{cls.__name__} lacks field {name!r}")
        data[name] = json.loads(named[name]) if name in _JSON_FIELDS else named[name]
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from e


def is_terminal(event: Event) -> bool:
    return not isinstance(event, TokenEvent)


# --- heartbeat --------------------------------------------------------------------------------


class Heartbeat(msgspec.Struct):
    """JSON value of ``helix:d:<daemon_id>``."""

    daemon_id: str
    model: str
    device: str
    queue: str
    pid: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_s: float
    acceptance_rate: float | None
    started_ms: int
    prefix_cache_hit_rate: float | None = None  # cached / looked-up prompt tokens, daemon's life
    # defaulted: a beat from a daemon that predates them still decodes
    weight_bytes: int = 0  # the weights in memory (target and draft model)
    # none | int8 | int4 | gguf (a GGUF file's own Q4 blocks): weight-only quantized linears
    quantization: str = "none"
