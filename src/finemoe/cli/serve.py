"""`finemoe serve`: an OpenAI-compatible server (completions, chat, streaming, metrics) over the engine."""
from __future__ import annotations

import argparse
import logging

from finemoe.cli.common import add_engine_args, engine_config
from finemoe.cli.preflight import check_port_free, require_extra
from finemoe.engine import Engine
from finemoe.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (FastAPI + uvicorn)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that sends none (capped by the room left in --max-model-len)")
    p.add_argument("--scheduling", choices=["continuous", "next-batch"], default="continuous",
                   help="continuous: requests join and leave the running batch at every step, prompts prefill in "
                        "chunks within --max-num-batched-tokens; next-batch: a request that arrives while a batch "
                        "runs waits for the next batch")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait for the engine; beyond them a request gets 429 with Retry-After "
                        "(0 = unbounded)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="next-batch: after a batch of n requests ends, wait up to this long for n requests to start "
                        "the next (its clients tend to come back together); a request at an idle server starts at once")
    p.add_argument("--save-interval", type=float, default=60.0, metavar="SECONDS",
                   help="save a learning policy's state (e.g. the finemoe --map-store) this often; 0 = only at exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port: use 0..65535")
    if args.default_max_tokens < 1:
        raise ConfigError("--default-max-tokens must be >= 1")
    if args.max_queue < 0:
        raise ConfigError("--max-queue must be >= 0 (0 = unbounded)")
    if args.batch_wait_ms < 0:
        raise ConfigError("--batch-wait-ms must be >= 0")
    if args.save_interval < 0:
        raise ConfigError("--save-interval must be >= 0 seconds")
    require_extra(["fastapi", "uvicorn", "prometheus_client"], "serve", "finemoe serve")
    check_port_free(args.host, args.port)


def run(args: argparse.Namespace) -> int:
    _check(args)
    import uvicorn  # the serve extra (checked above); imported here so other subcommands do not need it

    from finemoe.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    engine = Engine.from_config(engine_config(args))
    app = create_app(engine, default_max_tokens=args.default_max_tokens, save_interval_s=args.save_interval,
                     batch_wait_s=args.batch_wait_ms / 1e3, scheduling=args.scheduling,
                     max_queue=args.max_queue or None)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown: open streams get a few seconds to finish, then
    # the app's lifespan stops the scheduler and closes the engine (a persisting policy saves there).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=5)
    return 0
