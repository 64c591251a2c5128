"""``HelixClient``: the blocking client, with the same methods as ``AsyncHelixClient``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from helix_daemon.client.core import (
    CANCEL_LUA,
    DEFAULT_BLOCK_MS,
    DEFAULT_URL,
    QUEUED_TTL_S,
    READ_COUNT,
    RESERVE_LUA,
    QueueStatus,
    RequestResult,
    ResultBuilder,
    StreamReader,
    build_request,
    enqueue_fresh,
    meta_fields,
    parse_heartbeat,
    pick_group,
    scored_members,
    text_of,
)
from helix_daemon.wire.protocol import (
    DEFAULT_PREFIX,
    DEFAULT_QUEUE,
    Event,
    cancel_channel,
    check_request_id,
    daemon_key,
    daemons_key,
    encode_request_fields,
    meta_key,
    out_key,
    queue_key,
)


class HelixClient:
    """Blocking client with the same methods as ``AsyncHelixClient``."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue = queue
        self._cancel = client.register_script(CANCEL_LUA)
        self._reserve = client.register_script(RESERVE_LUA)

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, *, prefix: str = DEFAULT_PREFIX,
                 queue: str = DEFAULT_QUEUE, **redis_kwargs: Any) -> HelixClient:
        """Connect to ``url``; ``redis_kwargs`` go to ``redis.Redis.from_url``."""
        return cls(redis.Redis.from_url(url, **redis_kwargs), prefix=prefix, queue=queue)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> HelixClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, prompt: str | Sequence[int] | None = None, *,
               request_id: str | None = None, queue: str | None = None, **params: Any) -> str:
        """See ``AsyncHelixClient.submit``."""
        body = build_request(prompt, **params)
        queue = queue or self.queue
        if request_id is None:
            rid = uuid.uuid4().hex
            pipe = self.redis.pipeline(transaction=False)
            enqueue_fresh(pipe, rid, body, queue, self.prefix)
            pipe.execute()
            return rid
        check_request_id(request_id)
        meta = meta_key(request_id, self.prefix)
        if self._reserve(keys=[meta], args=[QUEUED_TTL_S]):
            return request_id
        fields = encode_request_fields(body, request_id)
        new_entry = self.redis.xadd(queue_key(queue, self.prefix), fields)  # type: ignore[arg-type]  # redis-py: invariant Dict[FieldT, EncodableT]
        pipe = self.redis.pipeline(transaction=True)
        for name, value in meta_fields(queue, new_entry):
            pipe.hsetnx(meta, name, value)
        pipe.execute()
        return request_id

    def stream(self, request_id: str, from_seq: int = 0, *, block_ms: int = DEFAULT_BLOCK_MS,
               timeout_s: float | None = None) -> Iterator[Event]:
        """See ``AsyncHelixClient.stream``."""
        key = out_key(request_id, self.prefix)
        reader = StreamReader(request_id, from_seq, block_ms, timeout_s)
        while not reader.finished:
            try:
                reply = self.redis.xread({key: reader.last_id}, count=READ_COUNT,
                                         block=reader.block_ms())
            except redis.TimeoutError:
                reply = None
            yield from reader.take(reply)

    def result(self, request_id: str, timeout_s: float | None = None) -> RequestResult:
        """See ``AsyncHelixClient.result``."""
        builder = ResultBuilder(request_id)
        for event in self.stream(request_id, timeout_s=timeout_s):
            result = builder.add(event)
            if result is not None:
                return result
        raise RuntimeError("stream ended without a terminal event")

    def cancel(self, request_id: str) -> bool:
        """See ``AsyncHelixClient.cancel``."""
        state = text_of(self._cancel(keys=[meta_key(request_id, self.prefix)],
                                   args=[QUEUED_TTL_S]))
        self.redis.publish(cancel_channel(self.prefix), request_id)
        return state not in ("done", "error", "cancelled")

    def meta(self, request_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(meta_key(request_id, self.prefix))
        return {text_of(k) or "": text_of(v) or "" for k, v in raw.items()}

    def status(self, queue: str | None = None) -> QueueStatus:
        """See ``AsyncHelixClient.status``."""
        queue = queue or self.queue
        qkey = queue_key(queue, self.prefix)
        try:
            pending, lag = pick_group(self.redis.xinfo_groups(qkey))
        except redis.ResponseError:
            pending, lag = 0, None
        daemons = []
        seen = self.redis.zrange(daemons_key(self.prefix), 0, -1, withscores=True)
        for daemon_id, score in scored_members(seen):
            beat = parse_heartbeat(self.redis.get(daemon_key(daemon_id, self.prefix)))
            daemons.append((daemon_id, int(score), beat))
        return QueueStatus(queue, self.redis.xlen(qkey), pending, lag, daemons)
