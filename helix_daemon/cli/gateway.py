"""``helix gateway``: the OpenAI-compatible HTTP gateway, settings from HELIX_* overridden by
flags."""

from __future__ import annotations

import argparse
import sys

from helix_daemon.client.core import DEFAULT_URL
from helix_daemon.gateway.config import GatewayConfig, parse_routes
from helix_daemon.wire.protocol import DEFAULT_PREFIX


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", dest="api_keys",
                   help="accepted Bearer key (repeatable; or HELIX_API_KEYS=k1,k2); none: open")
    p.add_argument("--route", action="append", dest="routes", metavar="MODEL=QUEUE",
                   help="serve MODEL from QUEUE (repeatable), besides the names daemons "
                        "advertise")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 1 MiB)")
    p.add_argument("--max-queue-depth", type=int,
                   help="429 when a model's queue holds this many entries (default 0 = no bound)")
    p.add_argument("--default-max-tokens", type=int,
                   help="max_tokens of chat requests that give none (default 256)")


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    given = {"api_keys": tuple(args.api_keys) if args.api_keys else None,
             "routes": parse_routes(args.routes) if args.routes else None,
             "max_body_bytes": args.max_body_bytes, "max_queue_depth": args.max_queue_depth,
             "default_max_tokens": args.default_max_tokens}
    overrides = {name: value for name, value in given.items() if value is not None}
    if args.redis_url != DEFAULT_URL:
        overrides["redis_url"] = args.redis_url
    if args.prefix != DEFAULT_PREFIX:
        overrides["prefix"] = args.prefix
    return GatewayConfig.from_env(**overrides)


def cmd_gateway(args: argparse.Namespace) -> int:
    from helix_daemon.gateway.run import serve  # FastAPI and uvicorn: only for this command

    config = gateway_config(args)
    if not config.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("helix gateway: no API key set and listening beyond loopback: anyone who can "
              "reach the port can use it", file=sys.stderr, flush=True)
    where = config.redis_url.rsplit("@", 1)[-1]  # never print a password
    print(f"helix gateway: http://{args.host}:{args.port}/v1 (Redis {where}, prefix "
          f"{config.prefix})", file=sys.stderr, flush=True)
    return serve(config, args.host, args.port, log_level=args.log_level)
