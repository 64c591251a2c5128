"""The OpenAI-compatible gateway against a real daemon (tiny Llama with a chat template) over the
shared Redis, driven by the official ``openai`` package and, for the wire format, raw HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import redis

from helix_daemon.client import HelixClient
from helix_daemon.gateway.config import GatewayConfig
from helix_daemon.testing.tiny_models import build_tiny_model
from helix_daemon.wire import protocol as p
from tests.daemon_harness import ThreadDaemon, start_thread_daemon, wait_until
from tests.gateway_harness import GatewayServer, add_chat_template
from tests.grammar_utils import SCHEMAS

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
LONG = {"ignore_eos": True}  # random weights may say EOS at once; tests that need text pass it


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama whose tokenizer has a chat template, long context for long jobs."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-chat"), "llama", max_positions=4096)
    return str(add_chat_template(path))


@pytest.fixture(scope="module")
def daemon(chat_model: str, redis_url: str, module_prefix: str) -> Iterator[ThreadDaemon]:
    d = start_thread_daemon(chat_model, redis_url, module_prefix)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def gateway(daemon: ThreadDaemon, module_prefix: str, redis_url: str) -> Iterator[GatewayServer]:
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix,
                                         routes={"ghost": "no-daemon-here"})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def helix(daemon: ThreadDaemon, redis_url: str, module_prefix: str) -> Iterator[HelixClient]:
    c = HelixClient.from_url(redis_url, prefix=module_prefix)
    yield c
    c.close()


def _streamed_text(stream: Any) -> tuple[list[str], list[Any]]:
    """Texts by choice index, and every chunk, of a streamed chat or completion."""
    texts: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return [texts[i] for i in sorted(texts)], chunks


def test_chat_streamed_and_whole_equal_the_redis_client(client: openai.OpenAI,
                                                        helix: HelixClient,
                                                        chat_model: str) -> None:
    """A greedy chat request gives the same text and usage whole, streamed, and submitted with
    the same ``messages`` through the Redis client; the model is found by the daemon's model
    path as well as by its queue name."""
    whole = client.chat.completions.create(model=chat_model, messages=CHAT, **GREEDY)
    texts, chunks = _streamed_text(client.chat.completions.create(
        model="default", messages=CHAT, stream=True, **GREEDY))
    direct = helix.result(helix.submit(messages=CHAT, **GREEDY), timeout_s=60)
    assert direct.ok and direct.usage is not None
    assert whole.choices[0].message.content == texts[0] == direct.text
    assert whole.choices[0].finish_reason == direct.finish_reason
    assert chunks[-1].choices[0].finish_reason == direct.finish_reason
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == direct.usage["prompt_tokens"]
    assert whole.usage.completion_tokens == direct.usage["completion_tokens"]
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")


def test_completions_streamed_and_whole_equal_the_redis_client(client: openai.OpenAI,
                                                               helix: HelixClient) -> None:
    """``/v1/completions`` with a text prompt and with token ids: whole, streamed and through
    the Redis client give the same text."""
    for prompt in ("Once upon a time", [5, 6, 7, 8]):
        whole = client.completions.create(model="default", prompt=prompt, **GREEDY)
        texts, _ = _streamed_text(client.completions.create(model="default", prompt=prompt,
                                                            stream=True, **GREEDY))
        direct = helix.result(helix.submit(prompt, **GREEDY), timeout_s=60)
        assert whole.choices[0].text == texts[0] == direct.text
        assert whole.object == "text_completion"


def test_include_usage_sends_a_last_chunk_with_the_usage(client: openai.OpenAI) -> None:
    """With ``stream_options.include_usage`` every chunk carries ``usage: null`` except one last
    chunk with no choices and the usage, equal to the non-streamed request's; the repeated
    prompt's full blocks come from the prefix cache (cached_tokens: all whole blocks before the
    last prompt token)."""
    whole = client.chat.completions.create(model="default", messages=CHAT, **GREEDY)
    _, chunks = _streamed_text(client.chat.completions.create(
        model="default", messages=CHAT, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage is not None and whole.usage is not None
    streamed, alone = chunks[-1].usage.model_dump(), whole.usage.model_dump()
    # the first of the two may or may not hit blocks an earlier test left: only the second must
    streamed.pop("prompt_tokens_details"), alone.pop("prompt_tokens_details")
    assert streamed == alone
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16
    _, plain = _streamed_text(client.chat.completions.create(
        model="default", messages=CHAT, stream=True, **GREEDY))
    assert all(c.usage is None and c.choices for c in plain)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    """A stop string taken from the middle of a greedy output ends the same request there
    (``finish_reason`` stop, the stop string left out), streamed and not."""
    params = {**GREEDY, "max_tokens": 24}
    full = client.completions.create(model="default", prompt="The day was", extra_body=LONG,
                                     **params).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[:full.index(stop)]
    whole = client.completions.create(model="default", prompt="The day was", stop=stop,
                                      extra_body=LONG, **params)
    texts, chunks = _streamed_text(client.completions.create(
        model="default", prompt="The day was", stop=[stop], stream=True, extra_body=LONG,
        **params))
    assert whole.choices[0].text == texts[0] == expected
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_entries(client: openai.OpenAI, helix: HelixClient) -> None:
    """``n=3`` with a seed makes three queue entries seeded ``seed``, ``seed+1``, ``seed+2``:
    the choices equal those requests through the Redis client, streamed and not, and a
    repeated request reproduces them."""
    params: dict[str, Any] = {"temperature": 1.0, "max_tokens": 10, "seed": 1234, "n": 3}
    whole = client.chat.completions.create(model="default", messages=CHAT, extra_body=LONG,
                                           **params)
    again = client.chat.completions.create(model="default", messages=CHAT, extra_body=LONG,
                                           **params)
    texts, _ = _streamed_text(client.chat.completions.create(
        model="default", messages=CHAT, stream=True, extra_body=LONG, **params))
    direct = [helix.result(helix.submit(messages=CHAT, temperature=1.0, max_tokens=10,
                                        seed=1234 + i, ignore_eos=True), timeout_s=60).text
              for i in range(3)]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == direct == texts
    assert [c.message.content for c in again.choices] == direct
    assert len(set(direct)) > 1, "different seeds should sample differently"
    assert whole.usage is not None and whole.usage.completion_tokens == 30


def test_stream_bytes_follow_openai_sse_format(gateway: GatewayServer) -> None:
    """The raw bytes of a chat stream: ``data: <json>\\n\\n`` events only, the first delta opens
    the assistant turn, the last chunk before ``data: [DONE]`` carries the finish reason."""
    body = {"model": "default", "messages": CHAT, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body,
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert set(chunk) >= {"id", "object", "created", "model", "choices"}
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def _error_body(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("params,param", [
    ({"temperature": -1.0}, None),  # refused by the wire's own validation
    ({"logprobs": True}, "logprobs"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"n": 1000}, "n"),
    ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
])
def test_invalid_parameters_are_400_in_openai_shape(client: openai.OpenAI,
                                                    params: dict[str, Any],
                                                    param: str | None) -> None:
    """Invalid or unsupported parameters answer 400 with OpenAI's error body, naming the
    parameter where there is one."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default", messages=CHAT, max_tokens=4, **params)
    error = _error_body(caught.value)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_unknown_model_is_404_and_model_without_daemon_is_503(client: openai.OpenAI) -> None:
    """A model nobody serves is 404 ``model_not_found``; a configured route whose queue has no
    live daemon is 503."""
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    assert _error_body(missing.value)["code"] == "model_not_found"
    with pytest.raises(openai.InternalServerError) as unserved:
        client.chat.completions.create(model="ghost", messages=CHAT, max_tokens=4)
    assert unserved.value.status_code == 503
    assert _error_body(unserved.value)["code"] == "model_not_served"


def test_models_health_and_metrics(client: openai.OpenAI, gateway: GatewayServer,
                                   chat_model: str) -> None:
    """``/v1/models`` lists the live daemon's model; ``/health`` and ``/metrics`` answer."""
    assert [m.id for m in client.models.list()] == [chat_model]
    assert client.models.retrieve(chat_model).owned_by == "helix"
    health = httpx.get(f"{gateway.url}/health").json()
    assert health == {"status": "ok", "daemons": 1}
    client.completions.create(model="default", prompt="Hi", max_tokens=2)
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'helix:gateway_requests_total{endpoint="/v1/completions",status="200"}' in metrics


def test_oversized_body_is_refused_before_redis(daemon: ThreadDaemon, redis_url: str,
                                                module_prefix: str,
                                                sync_redis: redis.Redis) -> None:
    """A body over ``max_body_bytes`` is 413 in OpenAI's shape and enqueues nothing, whether
    its size is declared or streamed in chunks."""
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix,
                                         max_body_bytes=2000)).start()
    queue = p.queue_key("default", module_prefix)
    try:
        before = sync_redis.xinfo_stream(queue)["entries-added"]
        body = {"model": "default", "prompt": "x" * 5000, "max_tokens": 2}
        declared = httpx.post(f"{server.base_url}/completions", json=body)

        def chunks() -> Iterator[bytes]:
            data = json.dumps(body).encode()
            yield from (data[i:i + 1000] for i in range(0, len(data), 1000))

        chunked = httpx.post(f"{server.base_url}/completions", content=chunks())
        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large"
        assert sync_redis.xinfo_stream(queue)["entries-added"] == before
    finally:
        server.stop()


def test_api_keys_refuse_missing_or_wrong_keys(daemon: ThreadDaemon, redis_url: str,
                                               module_prefix: str) -> None:
    """With API keys set, a request without a key or with a wrong one is 401; any configured
    key is accepted."""
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix,
                                         api_keys=("key-one", "key-two"))).start()
    try:
        for key in ("wrong", "key-one-and-more"):
            with openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0) as bad, \
                    pytest.raises(openai.AuthenticationError) as caught:
                bad.models.list()
            assert _error_body(caught.value)["code"] == "invalid_api_key"
        missing = httpx.get(f"{server.base_url}/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=server.base_url, api_key="key-two", max_retries=0) as good:
            answer = good.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_queue_deeper_than_the_bound_is_429(daemon: ThreadDaemon, redis_url: str,
                                            module_prefix: str, helix: HelixClient) -> None:
    """With ``max_queue_depth`` 1, a request while another is in the queue is 429; once the
    queue is empty again it is served."""
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix,
                                         max_queue_depth=1)).start()
    busy = helix.submit("Hello", max_tokens=3000, ignore_eos=True)
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.RateLimitError) as caught:
                c.completions.create(model="default", prompt="Hi", max_tokens=2)
            assert _error_body(caught.value)["code"] == "queue_full"
            helix.cancel(busy)
            helix.result(busy, timeout_s=60)
            wait_until(lambda: helix.status().length == 0, 30, "the queue to empty")
            assert c.completions.create(model="default", prompt="Hi", max_tokens=2).choices
    finally:
        server.stop()


def test_disconnect_mid_stream_cancels_and_frees_blocks(gateway: GatewayServer,
                                                        daemon: ThreadDaemon,
                                                        helix: HelixClient) -> None:
    """A client that closes its stream after the first tokens has its request cancelled: the
    request ends ``cancelled`` and the daemon's KV blocks are all free again."""
    body = {"model": "default", "prompt": "Hello", "max_tokens": 4000, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{gateway.base_url}/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        # the response id names the Helix request: cmpl-<request id>
        request_id = json.loads(first.removeprefix("data: "))["id"].removeprefix("cmpl-")
        assert helix.meta(request_id)["state"] == "running"
        assert daemon.kv_blocks_used() > 0
    # the response is closed here; the gateway cancels the entry it made for this stream
    wait_until(lambda: helix.meta(request_id).get("state") in p.TERMINAL_STATES, 60,
               "the request to end")
    assert helix.meta(request_id)["state"] == "cancelled"
    wait_until(lambda: daemon.kv_blocks_used() == 0, 30, "the KV blocks to be freed")
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "helix:gateway_client_disconnects_total 1.0" in metrics


def test_disconnect_while_waiting_for_a_whole_answer_cancels(gateway: GatewayServer,
                                                             daemon: ThreadDaemon,
                                                             helix: HelixClient) -> None:
    """A client of a non-streamed request that closes its connection while the answer is being
    generated has the request cancelled too (the gateway watches the connection, not only
    its writes)."""
    body = json.dumps({"model": "default", "prompt": "Hello", "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    queue = p.queue_key("default", helix.prefix)
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        def running() -> list[str]:
            entries = helix.redis.xrange(queue)
            ids = [p.decode_request(f, e.decode()).request_id for e, f in entries]
            return [r for r in ids if helix.meta(r).get("state") == "running"]

        wait_until(lambda: bool(running()), 60, "the request to run")
        (request_id,) = running()
    wait_until(lambda: helix.meta(request_id).get("state") in p.TERMINAL_STATES, 60,
               "the request to end")
    assert helix.meta(request_id)["state"] == "cancelled"
    wait_until(lambda: daemon.kv_blocks_used() == 0, 30, "the KV blocks to be freed")


def test_two_gateway_replicas_serve_the_same_streams(gateway: GatewayServer, redis_url: str,
                                                     module_prefix: str,
                                                     helix: HelixClient) -> None:
    """Two gateways on one Redis (stateless replicas) stream the same greedy requests with the
    same text as each other and as the Redis client, interleaved request by request."""
    second = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=module_prefix)).start()
    try:
        prompts = ["One", "Two", "Three", "Four"]
        clients = [openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0)
                   for g in (gateway, second)]
        got = {(i, prompt): _streamed_text(c.completions.create(
                   model="default", prompt=prompt, stream=True, **GREEDY))[0][0]
               for prompt in prompts for i, c in enumerate(clients)}
        for prompt in prompts:
            direct = helix.result(helix.submit(prompt, **GREEDY), timeout_s=60).text
            assert got[(0, prompt)] == got[(1, prompt)] == direct
        for c in clients:
            c.close()
    finally:
        second.stop()


def test_clients_wait_for_daemon_that_starts_late(redis_url: str, key_prefix: str,
                                                  chat_model: str) -> None:
    """With no daemon alive any model is 503; a daemon that starts later is routed to at once
    (the heartbeat table is read again on a miss)."""
    server = GatewayServer(GatewayConfig(redis_url=redis_url, prefix=key_prefix)).start()
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as caught:
                c.completions.create(model="default", prompt="Hi", max_tokens=2)
            assert caught.value.status_code == 503
            late = start_thread_daemon(chat_model, redis_url, key_prefix)
            try:
                answer = c.completions.create(model="default", prompt="Hi", max_tokens=2)
                assert answer.choices[0].finish_reason in ("stop", "length")
            finally:
                late.stop()
    finally:
        server.stop()


def test_gateway_flags_override_helix_variables_only_when_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``helix gateway`` reads HELIX_* (keys, routes, bounds, Redis URL) and its flags override
    them only when given; a malformed route or number is refused."""
    from helix_daemon.cli.gateway import gateway_config
    from helix_daemon.cli.main import build_parser

    monkeypatch.setenv("HELIX_API_KEYS", "k1, k2")
    monkeypatch.setenv("HELIX_GATEWAY_ROUTES", "small=q1,big=q2")
    monkeypatch.setenv("HELIX_GATEWAY_MAX_QUEUE_DEPTH", "7")
    monkeypatch.setenv("HELIX_REDIS_URL", "rediss://u:pw@redis.example:6380/1")
    plain = gateway_config(build_parser().parse_args(["gateway"]))
    assert plain.api_keys == ("k1", "k2") and plain.routes == {"small": "q1", "big": "q2"}
    assert plain.max_queue_depth == 7 and plain.redis_url.startswith("rediss://u:pw@")
    flags = gateway_config(build_parser().parse_args([
        "gateway", "--api-key", "k3", "--route", "tiny=q3", "--max-queue-depth", "0",
        "--redis-url", "redis://other:6379/0"]))
    assert flags.api_keys == ("k3",) and flags.routes == {"tiny": "q3"}
    assert flags.max_queue_depth == 0 and flags.redis_url == "redis://other:6379/0"
    with pytest.raises(ValueError, match="name=queue"):
        gateway_config(build_parser().parse_args(["gateway", "--route", "nope"]))
    monkeypatch.setenv("HELIX_GATEWAY_MAX_N", "many")
    with pytest.raises(ValueError, match="HELIX_GATEWAY_MAX_N"):
        gateway_config(build_parser().parse_args(["gateway"]))


def test_response_format_json_schema_answers_valid_json(client: openai.OpenAI) -> None:
    """OpenAI's ``response_format`` json_schema through the gateway: the answer, whole and
    streamed, parses and follows the schema and ends with ``stop``; an unknown format type and a
    schema that does not compile (the daemon's ``invalid_request``) are 400s."""
    schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}
    whole = client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                           max_tokens=80, response_format=fmt)
    text = whole.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), schema)
    assert whole.choices[0].finish_reason == "stop"
    streamed, _ = _streamed_text(client.chat.completions.create(
        model="default", messages=CHAT, temperature=0, max_tokens=80, response_format=fmt,
        stream=True))
    assert streamed == [text]
    bad_schema = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}}
    for bad in ({"type": "xml"}, bad_schema):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="default", messages=CHAT, max_tokens=8,
                                           response_format=bad)  # type: ignore[arg-type]
        assert _error_body(caught.value)["type"] == "invalid_request_error"
