"""``helix batch``: run a JSONL file of requests, resumable (finished ids are skipped, results
already in Redis are reused).

A line is a Helix request body (with an optional ``id``), or a line of OpenAI's batch format
(``custom_id``, ``method``, ``url``, ``body``): the body is read as the gateway reads that
endpoint's requests (its ``model`` is ignored: ``--queue`` says where it runs) and the result is
written as OpenAI's output line (``custom_id``, ``response.status_code``, ``response.body``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from helix_daemon.client import AsyncHelixClient, RequestResult
from helix_daemon.client.core import ResultBuilder
from helix_daemon.wire.protocol import TokenEvent
from scheduler.errors import InvalidRequestError

if TYPE_CHECKING:  # the gateway's parsing needs pydantic (the gateway extra): imported lazily
    from helix_daemon.gateway.batch.lines import Line

BATCH_NAMESPACE = uuid.UUID("5b0f3c1e-6d8a-4f4e-9a51-3c2f0e7b8d11")  # uuid5 namespace of batch ids
OPENAI_DEFAULT_MAX_TOKENS = 256  # chat lines without max_tokens (the gateway's default)


@dataclass
class BatchItem:
    """One line of a batch: its id and body, or why it cannot be submitted."""

    line: int
    request_id: str
    body: dict[str, Any]
    invalid: str | None = None
    openai: Line | None = None  # a line of OpenAI's batch format


@dataclass
class BatchReport:
    """What a batch run did, with the client-side timings the demo summarises."""

    total: int = 0
    skipped: int = 0  # already in the output file
    reused: int = 0  # finished in Redis before this run: result copied, nothing enqueued
    results: list[RequestResult] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # submit -> first token event
    e2e_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok)


def read_batch(path: Path) -> list[BatchItem]:
    """Parse a JSONL file; ids default to uuid5(sha256(file), line number) so a re-run of the
    same file maps every line to the same request."""
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    items = []
    for number, raw in enumerate(content.decode("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        default_id = str(uuid.uuid5(BATCH_NAMESPACE, f"{digest}:{number}"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("a line must be a JSON object")
        except ValueError as e:
            items.append(BatchItem(number, default_id, {}, invalid=f"line {number}: {e}"))
            continue
        if "custom_id" in body:
            items.append(_openai_item(number, digest, body))
            continue
        request_id = str(body.pop("id", None) or default_id)
        items.append(BatchItem(number, request_id, body))
    return items


def _openai_item(number: int, digest: str, item: dict[str, Any]) -> BatchItem:
    """A line of OpenAI's batch format; its id is derived from its ``custom_id``."""
    from helix_daemon.gateway.batch.lines import to_line

    custom_id = str(item["custom_id"])
    request_id = str(uuid.uuid5(BATCH_NAMESPACE, f"{digest}:custom_id:{custom_id}"))
    line = to_line(custom_id, request_id, str(item.get("url")), item.get("body"),
                   OPENAI_DEFAULT_MAX_TOKENS)
    if line.choice is None:
        message = line.error.message if line.error else "invalid line"
        return BatchItem(number, request_id, {}, invalid=message, openai=line)
    return BatchItem(number, request_id, line.choice.body, openai=line)


def result_line(item: BatchItem, result: RequestResult) -> str:
    """The output line of one item: OpenAI's format for an OpenAI line, else Helix's."""
    if item.openai is None:
        return json.dumps({"line": item.line, **result.to_dict()}, ensure_ascii=False)
    from helix_daemon.gateway.batch.lines import error_line, output_line

    if item.openai.error is not None:
        return error_line(item.openai, item.openai.error.status, item.openai.error.body())
    return output_line(item.openai, result)[1]


def finished_ids(path: Path) -> set[str]:
    """Ids already written to an output file (a torn last line is ignored)."""
    if not path.exists():
        return set()
    done = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(raw)
            done.add(record["response"]["request_id"] if "custom_id" in record
                     else record["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


async def run_batch(client: AsyncHelixClient, items: Sequence[BatchItem], out: TextIO | None,
                    *, concurrency: int = 32, timeout_s: float | None = None,
                    skip: set[str] | None = None, progress: bool = True) -> BatchReport:
    """Submit ``items`` with at most ``concurrency`` in flight; write each result as one JSONL
    line the moment it finishes (so an interrupted run loses nothing it already has)."""
    skip = skip or set()
    todo = [item for item in items if item.request_id not in skip]
    report = BatchReport(total=len(items), skipped=len(items) - len(todo))
    queue: asyncio.Queue[BatchItem] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(todo), disable=not progress or None, unit="req", file=sys.stderr)
    start = time.perf_counter()

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            result = await _run_item(client, item, report, timeout_s)
            report.results.append(result)
            if out is not None:
                out.write(result_line(item, result) + "\n")
                out.flush()
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        bar.close()
    report.wall_s = time.perf_counter() - start
    return report


async def _run_item(client: AsyncHelixClient, item: BatchItem, report: BatchReport,
                    timeout_s: float | None) -> RequestResult:
    if item.invalid is not None:
        return RequestResult(item.request_id, "error", error_code="invalid_request",
                             error_message=item.invalid)
    if (await client.meta(item.request_id)).get("state") == "done":
        report.reused += 1
    start = time.perf_counter()
    try:
        await client.submit(request_id=item.request_id, **item.body)
    except InvalidRequestError as e:
        return RequestResult(item.request_id, "error", error_code="invalid_request",
                             error_message=str(e))
    builder = ResultBuilder(item.request_id)
    async for event in client.stream(item.request_id, timeout_s=timeout_s):
        if isinstance(event, TokenEvent) and event.seq == 0:
            report.ttft_s.append(time.perf_counter() - start)
        result = builder.add(event)
        if result is not None:
            report.e2e_s.append(time.perf_counter() - start)
            return result
    raise RuntimeError("stream ended without a terminal event")


def cmd_batch(args: argparse.Namespace) -> int:
    items = read_batch(args.input)
    skip = finished_ids(args.output)

    async def go() -> BatchReport:
        async with AsyncHelixClient.from_url(args.redis_url, prefix=args.prefix,
                                             queue=args.queue) as client:
            with args.output.open("a", encoding="utf-8") as out:
                return await run_batch(client, items, out, concurrency=args.concurrency,
                                       timeout_s=args.timeout_s, skip=skip,
                                       progress=not args.no_progress)

    report = asyncio.run(go())
    print(f"{report.total} requests: {report.skipped} already in {args.output}, "
          f"{len(report.results)} written ({report.reused} reused from Redis), "
          f"{report.failed} failed, {report.wall_s:.1f}s", file=sys.stderr)
    return 1 if report.failed else 0
