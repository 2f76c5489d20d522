"""`finemoe serve`: an OpenAI-compatible server (completions, chat, streaming, metrics) over the engine."""
from __future__ import annotations

import argparse
import logging
import os

from finemoe.cli.common import add_engine_args, engine_config
from finemoe.cli.preflight import check_port_free, require_extra
from finemoe.errors import ConfigError
from finemoe.server.scheduler import SCHEDULING

API_KEY_ENV = "FINEMOE_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and GET /v1/models lists (default: the --model name)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file for /v1/chat/completions, replacing the tokenizer's own")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise; /health and /metrics "
                        f"stay open); default: ${API_KEY_ENV} if set, else no key")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens of a request that sends none (capped by the room left in --max-model-len)")
    p.add_argument("--scheduling", choices=SCHEDULING, default=SCHEDULING[0],
                   help="continuous: requests join and leave the running batch at every step, prompts prefill in "
                        "chunks within --max-num-batched-tokens; next-batch: a request that arrives while a batch "
                        "runs waits for the next batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="continuous: tokens per engine step, one per running request, prompt chunks fill the rest "
                        "(long prompts prefill over several steps); at least --max-batch-size (default: 2048, or "
                        "--max-batch-size when larger)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait for the engine; beyond them a request gets 429 with Retry-After "
                        "(0 = unbounded)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, metavar="MS",
                   help="next-batch: after a batch of n requests ends, wait up to this long for n requests to start "
                        "the next (its clients tend to come back together); a request at an idle server starts at once")
    p.add_argument("--save-interval", type=float, default=60.0, metavar="SECONDS",
                   help="save a learning policy's state (e.g. the finemoe --map-store) this often; 0 = only at exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log verbosity")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=run)


def _read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not valid UTF-8"
        raise ConfigError(f"--chat-template {path!r}: cannot read it ({why}): name a UTF-8 Jinja template "
                          "file") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path!r} is empty: name a Jinja chat template file")
    import jinja2   # transformers' own dependency: its chat templates are Jinja

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template {path!r}: line {e.lineno}: {e.message}: fix the Jinja syntax") from None
    return text


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
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ConfigError("--served-model-name is empty: name the model clients should send, or drop the flag")
    if args.api_key is not None and not args.api_key:
        raise ConfigError("--api-key is empty: pass a key, or drop the flag to serve without one")
    require_extra(["fastapi", "uvicorn", "prometheus_client"], "serve", "finemoe serve")
    check_port_free(args.host, args.port)


def run(args: argparse.Namespace) -> int:
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    _check(args)
    chat_template = _read_chat_template(args.chat_template)
    import uvicorn  # the serve extra (checked above); imported here so other subcommands do not need it

    from finemoe.engine import Engine
    from finemoe.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    engine = Engine.from_config(engine_config(args, warm_up=True, max_num_batched_tokens=args.max_num_batched_tokens))
    logging.getLogger("finemoe").info("warm-up %.2f s before accepting requests (in no request's TTFT)",
                                      engine.warm_up_s)
    app = create_app(engine, default_max_tokens=args.default_max_tokens, save_interval_s=args.save_interval,
                     batch_wait_s=args.batch_wait_ms / 1e3, scheduling=args.scheduling,
                     max_queue=args.max_queue or None, served_model_name=args.served_model_name,
                     chat_template=chat_template, api_key=args.api_key)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown: open streams get a few seconds to finish, then
    # the app's lifespan stops the scheduler and closes the engine (a persisting policy saves there).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=5)
    return 0
