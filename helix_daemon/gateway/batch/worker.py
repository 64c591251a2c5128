"""``BatchWorker``: every replica runs one; it advances the batches whose lease it holds.

validating -> (lines checked) -> in_progress -> (lines enqueued, at most ``window`` of a batch
in the queue at once, so that a large batch never stands in front of interactive requests in
the first-in-first-out queue; all lines ended) -> finalizing -> (output and error files
written) -> completed; a bad input file -> failed; cancelling -> (open lines cancelled, lines
not yet enqueued never will be, all ended, files written) -> cancelled; in_progress past
``expires_at`` -> expiring -> (open lines cancelled, files written at once, every line not done
answered ``batch_expired``) -> expired. Every step can be
repeated from the state in Redis (ids are derived, files named after the batch), so a replica
that dies mid-step leaves nothing another one cannot redo.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import structlog

from helix_daemon.client import AsyncHelixClient, RequestResult
from helix_daemon.gateway.batch.files import FileStore
from helix_daemon.gateway.batch.lines import (
    BatchFileError,
    Line,
    error_line,
    expired_line,
    output_line,
    parse_input,
)
from helix_daemon.gateway.batch.store import BatchStore
from helix_daemon.gateway.errors import APIError
from helix_daemon.gateway.routes import ModelRoutes
from helix_daemon.wire.protocol import TERMINAL_STATES, meta_key

log = structlog.get_logger(__name__)
BATCH_RESULT_TTL_S = 2 * 86_400  # a line's result must outlive the 24 h window's bookkeeping
_READS_AT_ONCE = 64
_NEVER_RAN = (500, APIError(500, "the batch was cancelled before this line ran", "server_error",
                            code="cancelled").body())


class BatchWorker:
    """Advance the active batches, one lease at a time."""

    def __init__(self, client: AsyncHelixClient, routes: ModelRoutes, files: FileStore,
                 batches: BatchStore, default_max_tokens: int, window: int = 128,
                 poll_s: float = 0.5, lease_ms: int = 5000) -> None:
        self.client = client
        self.routes = routes
        self.files = files
        self.batches = batches
        self.default_max_tokens = default_max_tokens
        self.window = window  # lines of one batch in the queue at once
        self.poll_s = poll_s
        self.lease_ms = lease_ms
        self.replica_id = uuid.uuid4().hex
        self._parsed: dict[str, list[Line]] = {}  # batch id -> its lines (the file never changes)

    async def run(self) -> None:
        """Until cancelled: look at the active batches every ``poll_s``."""
        while True:
            try:
                await self.tick()
            except Exception:  # Redis away, a bug in one batch: log, keep the loop alive
                log.exception("batch worker round failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> None:
        for batch_id in await self.batches.active():
            if await self.batches.take_lease(batch_id, self.replica_id, self.lease_ms):
                await self.advance(batch_id)

    async def advance(self, batch_id: str) -> None:
        batch = await self.batches.get(batch_id)
        if batch is None:
            return
        status = batch["status"]
        if status == "in_progress" and time.time() >= batch["expires_at"]:
            if not await self.batches.transition(batch_id, "expiring", "in_progress"):
                return  # cancelled meanwhile: the next round goes on from there
            status = "expiring"
        if status == "validating":
            await self._start(batch_id, batch["input_file_id"], batch["endpoint"])
        elif status == "expiring":
            await self._expire(batch_id, batch["input_file_id"], batch["endpoint"])
        elif status in ("in_progress", "finalizing", "cancelling"):
            await self._follow(batch_id, batch["input_file_id"], batch["endpoint"], status)
        else:
            self._parsed.pop(batch_id, None)

    async def _lines(self, batch_id: str, input_file_id: str, endpoint: str) -> list[Line]:
        if batch_id not in self._parsed:
            content = await self.files.content(input_file_id)
            if content is None:
                raise BatchFileError(f"the input file {input_file_id} does not exist (expired?)")
            self._parsed[batch_id] = parse_input(content, endpoint, batch_id,
                                                 self.default_max_tokens)
        return self._parsed[batch_id]

    async def _start(self, batch_id: str, input_file_id: str, endpoint: str) -> None:
        try:
            lines = await self._lines(batch_id, input_file_id, endpoint)
        except BatchFileError as e:
            await self.batches.update(batch_id, errors={"object": "list", "data": [
                {"code": "invalid_file", "message": str(e), "param": None, "line": None}]})
            await self.batches.transition(batch_id, "failed", "validating")
            return
        errors = {line.custom_id: _stored(line.error) for line in lines if line.error}
        await self.batches.add_line_errors(batch_id, errors)
        await self.batches.update(batch_id, request_counts={
            "total": len(lines), "completed": 0, "failed": len(errors)})
        await self.batches.transition(batch_id, "in_progress", "validating")

    async def _submit_more(self, batch_id: str, queued: list[Line],
                           states: dict[str, str | None]) -> None:
        """Keep ``window`` lines of the batch in the queue: enqueue the next ones in file order
        (a line enqueued by an earlier round is a no-op). A line whose model nobody serves
        becomes an error line."""
        in_flight = sum(s is not None and s not in TERMINAL_STATES for s in states.values())
        unsent = [line for line in queued if states[line.request_id] is None]
        errors: dict[str, dict[str, Any]] = {}
        for line in unsent[:max(0, self.window - in_flight)]:
            assert line.request is not None and line.choice is not None
            try:
                queue = await self.routes.resolve(line.request.model)
            except APIError as e:
                errors[line.custom_id] = _stored(e)
                continue
            await self.client.submit(request_id=line.request_id, queue=queue,
                                     result_ttl_s=BATCH_RESULT_TTL_S, **line.choice.body)
            states[line.request_id] = "queued"
        await self.batches.add_line_errors(batch_id, errors)

    async def _follow(self, batch_id: str, input_file_id: str, endpoint: str,
                      status: str) -> None:
        lines = await self._lines(batch_id, input_file_id, endpoint)
        errors = await self.batches.line_errors(batch_id)
        queued = [line for line in lines if line.custom_id not in errors]
        states = dict(zip((line.request_id for line in queued), await self._states(queued)))
        if status == "in_progress":
            await self._submit_more(batch_id, queued, states)
        elif status == "cancelling":
            for line in queued:
                if states[line.request_id] not in TERMINAL_STATES | {None}:
                    await self.client.cancel(line.request_id)
        done = sum(state == "done" for state in states.values())
        ended = sum(state in TERMINAL_STATES for state in states.values())
        # cancelling: a line never enqueued will never run: it counts as ended
        never_ran = sum(state is None for state in states.values()) if status == "cancelling" \
            else 0
        await self.batches.update(batch_id, request_counts={
            "total": len(lines), "completed": done, "failed": ended - done + len(errors)})
        if ended + never_ran < len(queued):
            return
        if status == "in_progress" and \
                not await self.batches.transition(batch_id, "finalizing", "in_progress"):
            return  # cancelled meanwhile: the next round finishes it as cancelled
        await self._write_files(batch_id, lines, errors, states)
        final = "cancelled" if status == "cancelling" else "completed"
        await self.batches.transition(batch_id, final, "finalizing", "cancelling")
        self._parsed.pop(batch_id, None)

    async def _expire(self, batch_id: str, input_file_id: str, endpoint: str) -> None:
        """Cancel the lines still in the queue, then end the batch at once: unlike a cancel it
        does not wait for daemons to confirm (a batch often expires because none is left)."""
        lines = await self._lines(batch_id, input_file_id, endpoint)
        errors = await self.batches.line_errors(batch_id)
        queued = [line for line in lines if line.custom_id not in errors]
        for line, state in zip(queued, await self._states(queued)):
            if state not in TERMINAL_STATES | {None}:
                await self.client.cancel(line.request_id)
        # read again: a line that finished before its cancel arrived keeps its answer
        states = dict(zip((line.request_id for line in queued), await self._states(queued)))
        await self._write_files(batch_id, lines, errors, states, expired=True)
        await self.batches.transition(batch_id, "expired", "expiring")
        self._parsed.pop(batch_id, None)

    async def _states(self, lines: list[Line]) -> list[str | None]:
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.hget(meta_key(line.request_id, self.client.prefix), "state")
            raw = await pipe.execute()
        return [None if v is None else v.decode() for v in raw]

    async def _write_files(self, batch_id: str, lines: list[Line],
                           errors: dict[str, dict[str, Any]],
                           states: dict[str, str | None], expired: bool = False) -> None:
        """The output and error files, in input order, every custom_id in exactly one. In an
        expired batch a line that did not end by itself (cancelled, still open, never sent)
        is answered ``batch_expired``."""
        answered = {"done", "error"} if expired else TERMINAL_STATES
        results = await self._results([line for line in lines
                                       if states.get(line.request_id) in answered])
        good: list[str] = []
        bad: list[str] = []
        for line in lines:
            if line.custom_id in errors:
                stored = errors[line.custom_id]
                bad.append(error_line(line, stored["status_code"], stored["body"]))
            elif line.request_id in results:
                ok, text = output_line(line, results[line.request_id])
                (good if ok else bad).append(text)
            elif expired:
                bad.append(expired_line(line))
            else:
                bad.append(error_line(line, *_NEVER_RAN))
        changes: dict[str, object] = {"request_counts": {
            "total": len(lines), "completed": len(good), "failed": len(bad)}}
        if good:
            meta = await self.files.create(_jsonl(good), f"{batch_id}_output.jsonl",
                                           "batch_output", f"file-{batch_id}-output")
            changes["output_file_id"] = meta["id"]
        if bad:
            meta = await self.files.create(_jsonl(bad), f"{batch_id}_error.jsonl",
                                           "batch_output", f"file-{batch_id}-errors")
            changes["error_file_id"] = meta["id"]
        await self.batches.update(batch_id, **changes)

    async def _results(self, lines: list[Line]) -> dict[str, RequestResult]:
        gate = asyncio.Semaphore(_READS_AT_ONCE)

        async def one(line: Line) -> RequestResult:
            async with gate:
                return await self.client.result(line.request_id, timeout_s=60)

        found = await asyncio.gather(*(one(line) for line in lines))
        return {r.request_id: r for r in found}


def _stored(error: APIError) -> dict[str, Any]:
    """How a line's error is kept in Redis until the error file is written."""
    return {"status_code": error.status, "body": error.body()}


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
