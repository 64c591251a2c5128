"""``helix submit``, ``stream``, ``cancel`` and ``status``: thin layers over ``HelixClient``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import msgspec

from helix_daemon.client import HelixClient
from helix_daemon.wire.protocol import CancelledEvent, DoneEvent, ErrorEvent, TokenEvent


def _client(args: argparse.Namespace) -> HelixClient:
    return HelixClient.from_url(args.redis_url, prefix=args.prefix, queue=args.queue)


def submit_params(args: argparse.Namespace) -> dict[str, Any]:
    """Body fields from the submit flags: only those given, so the daemon defaults apply."""
    params: dict[str, Any] = json.loads(args.body) if args.body else {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                 "ignore_eos", "priority", "timeout_s", "num_speculative_tokens",
                 "result_ttl_s"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.prompt_ids:
        params["prompt_token_ids"] = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    messages = chat_messages(args.system, args.user)
    if messages:
        params["messages"] = messages
    return params


def chat_messages(system: str | None, user: str | None) -> list[dict[str, str]]:
    """The ``messages`` of ``--system``/``--user`` (none when neither is given)."""
    if system is not None and user is None:
        raise ValueError("--system needs --user (the message the model answers)")
    messages = [{"role": "system", "content": system}] if system is not None else []
    if user is not None:
        messages.append({"role": "user", "content": user})
    return messages


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rid = client.submit(args.prompt, request_id=args.request_id, **submit_params(args))
        print(rid, flush=True)
        if not args.stream:
            return 0
        return _print_stream(client, rid, 0, as_json=False, timeout_s=None)


def cmd_stream(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_stream(client, args.id, args.from_seq, args.json, args.timeout_s)


def _print_stream(client: HelixClient, rid: str, from_seq: int, as_json: bool,
                  timeout_s: float | None, out: TextIO | None = None) -> int:
    """Print text deltas as they arrive (or JSON events); exit 0 only for ``done``."""
    out = out or sys.stdout  # looked up per call: tests and pipes may replace it
    for event in client.stream(rid, from_seq, timeout_s=timeout_s):
        tag = event.__struct_config__.tag
        if as_json:
            record = {"type": tag, **msgspec.to_builtins(event)}
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
        elif isinstance(event, TokenEvent):
            print(event.text, end="", file=out, flush=True)
        else:
            print(file=out)
            print(terminal_line(event), file=sys.stderr, flush=True)
        if tag != "token":
            return 0 if tag == "done" else 1
    return 1  # unreachable: stream() ends only after a terminal event or by raising


def terminal_line(event: DoneEvent | ErrorEvent | CancelledEvent) -> str:
    if isinstance(event, DoneEvent):
        t = event.timings
        accepted = "" if t.acceptance_rate is None else f", drafts accepted {t.acceptance_rate:.0%}"
        return (f"[done: {event.finish_reason}, {event.usage.completion_tokens} tokens, "
                f"ttft {t.ttft_s or 0:.3f}s, {t.tokens_per_s:.1f} tok/s{accepted}, "
                f"attempts {t.attempts}]")
    if isinstance(event, ErrorEvent):
        return f"[error {event.code}: {event.message}]"
    return f"[cancelled: {event.reason}]"


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for rid in args.ids:
            pending = client.cancel(rid)
            print(f"{rid}\t{'cancel requested' if pending else 'already finished'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(msgspec.to_builtins(status)))
        return 0
    print(format_status(status, now_ms=int(time.time() * 1000)))
    return 0


def format_status(status: Any, now_ms: int) -> str:
    lag = "" if status.lag is None else f", {status.lag} not yet delivered"
    lines = [f"queue {status.queue}: {status.length} entries, {status.pending} pending{lag}", ""]
    header = ("DAEMON", "STATE", "SEEN", "MODEL", "DEVICE", "WEIGHTS", "RUN", "WAIT", "KV USE",
              "TOK/S", "ACCEPT", "CACHE HIT")
    rows = [header]
    for daemon_id, seen_ms, beat in status.daemons:
        age = f"{max(0, now_ms - seen_ms) / 1000:.0f}s ago"
        if beat is None:
            rows.append((daemon_id, "gone", age, *["-"] * (len(header) - 3)))
            continue
        kv = beat.kv_blocks_used / beat.kv_blocks_total if beat.kv_blocks_total else 0.0
        accept = "-" if beat.acceptance_rate is None else f"{beat.acceptance_rate:.2f}"
        weights = f"{beat.weight_bytes / 1e6:.0f} MB" + (
            f" {beat.quantization}" if beat.quantization != "none" else "")
        hits = "-" if beat.prefix_cache_hit_rate is None else f"{beat.prefix_cache_hit_rate:.0%}"
        rows.append((daemon_id, "alive", age, Path(beat.model).name or beat.model, beat.device,
                     weights, str(beat.running), str(beat.waiting),
                     f"{kv:.0%} ({beat.kv_blocks_used}/{beat.kv_blocks_total})",
                     f"{beat.tokens_per_s:.1f}", accept, hits))
    if len(rows) == 1:
        return "\n".join([*lines, "no daemons registered"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
