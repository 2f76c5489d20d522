"""The FastAPI app: OpenAI-compatible routes over one engine, its scheduler thread and its metrics.

    POST /v1/completions        POST /v1/chat/completions     (stream or not)
    GET  /v1/models             GET  /v1/models/{id}
    GET  /health                GET  /metrics (Prometheus)

With an API key every /v1 route needs `Authorization: Bearer KEY` (401 in OpenAI's error format otherwise);
/health and /metrics stay open for load balancers and Prometheus scrapers (they show the model, policy and
counters, never prompts or outputs).

The scheduler thread starts with the app and stops at shutdown, which cancels what is still
running and closes the engine (a persisting policy saves its state there).
"""
from __future__ import annotations

import copy
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from finemoe.server import generation
from finemoe.server.metrics import ServerMetrics
from finemoe.server.persistence import PolicyPersistence
from finemoe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from finemoe.server.scheduler import Scheduler

log = logging.getLogger("finemoe.server")
BATCHING = {
    "continuous": ("every engine step decodes every running request and admits queued ones first come, first served "
                   "while the batch has a free row (max_batch_size) and token budget (max_num_batched_tokens; long "
                   "prompts prefill in chunks); a finished or disconnected request frees its row at the next step"),
    "next-batch": ("requests queue and run in batches of up to max_batch_size; decode steps of a batch share one "
                   "forward pass; a request that arrives while a batch runs joins the NEXT batch; a finished or "
                   "disconnected request leaves its batch at the next step"),
}


@dataclass
class ServerState:
    engine: object
    scheduler: Scheduler
    metrics: ServerMetrics
    persistence: PolicyPersistence
    tokenizer: object          # the HTTP side's own copy; the engine thread uses engine.tokenizer
    model_name: str
    max_model_len: int
    default_max_tokens: int
    vocab_size: int
    started: int


def create_app(engine, *, default_max_tokens: int = 256, save_interval_s: float = 60.0,
               batch_wait_s: float = 0.05, scheduling: str = "continuous", max_queue: int | None = None,
               served_model_name: str | None = None, chat_template: str | None = None,
               api_key: str | None = None) -> FastAPI:
    """An app serving `engine`, which it owns: shutdown closes it. Batch size, token budget and max model length
    come from engine.cfg; `scheduling` and `batch_wait_s` (next-batch: how long, after a batch of n ends, the next
    waits for n requests) see server/scheduler.py; beyond `max_queue` waiting requests a request gets 429.
    `served_model_name`: the model id clients send (default engine.model_name); `chat_template`: Jinja text
    replacing the tokenizer's for chat requests; `api_key`: required as a Bearer token on the /v1 routes."""
    metrics = ServerMetrics()
    persistence = PolicyPersistence(engine, save_interval_s)
    scheduler = Scheduler(engine, metrics, persistence, engine.cfg.max_batch_size, batch_wait_s, scheduling, max_queue)
    tokenizer = copy.deepcopy(engine.tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    state = ServerState(
        engine=engine, scheduler=scheduler,
        metrics=metrics, persistence=persistence, tokenizer=tokenizer,
        model_name=served_model_name or engine.model_name, max_model_len=engine.max_model_len,
        default_max_tokens=default_max_tokens, vocab_size=engine.model.get_input_embeddings().num_embeddings,
        started=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        log.info("serving %s (%s) with policy %r; %s", state.model_name, engine.model_label, engine.cfg.policy,
                 BATCHING[state.scheduler.scheduling])
        try:
            yield
        finally:
            state.scheduler.stop()

    app = FastAPI(title="finemoe", description="OpenAI-compatible MoE serving with offloaded experts",
                  lifespan=lifespan)
    app.state.finemoe = state
    _add_error_handlers(app, metrics)
    _add_routes(app, state, api_key)
    return app


def _bearer_check(api_key: str):
    """A dependency refusing a request without `Authorization: Bearer <api_key>` (401, OpenAI's error format)."""
    async def check(http: HTTPRequest) -> None:
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError("no API key was provided: send 'Authorization: Bearer KEY' (the openai client's "
                           "api_key)", status=401, code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("incorrect API key provided", status=401, code="invalid_api_key")
    return check


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        if e.status < 500:
            metrics.requests.labels("invalid").inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), e.status_code, kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("internal error while handling a request")
        body = APIError("internal server error (see the server log)", 500, "server_error").body()
        return JSONResponse(body, status_code=500)


def _add_routes(app: FastAPI, state: ServerState, api_key: str | None) -> None:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_check(api_key))] if api_key else [])

    async def generate(http: HTTPRequest, model_cls) -> Response:
        body = parse_body(await http.body(), model_cls)
        gen = generation.submit(state, body)
        if body.stream:
            return StreamingResponse(generation.stream(gen, http), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await generation.collect(gen, http))
        except generation.ClientGone:
            return Response(status_code=499)

    @v1.post("/completions")
    async def completions(http: HTTPRequest) -> Response:
        return await generate(http, CompletionRequest)

    @v1.post("/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Response:
        return await generate(http, ChatCompletionRequest)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "finemoe",
                "max_model_len": state.max_model_len}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise APIError(f"the model {model_id!r} does not exist: this server serves {state.model_name!r}",
                           status=404, type="invalid_request_error", param="model", code="model_not_found")
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        e = state.engine
        alive = state.scheduler.alive
        body = {"status": "ok" if alive else "unavailable", "model": state.model_name, "model_label": e.model_label,
                "policy": e.cfg.policy, "device": str(e.device), "expert_budget_bytes": e.budget_bytes,
                "cache_slots": e.cache.capacity, "max_batch_size": state.scheduler.max_batch_size,
                "max_model_len": state.max_model_len, "queue_depth": state.scheduler.queue_depth,
                "max_queue": state.scheduler.max_queue, "running": state.scheduler.running,
                "policy_state": state.scheduler.policy_state, "policy_saves": state.persistence.saves,
                "warm_up_s": e.warm_up_s, "scheduling": state.scheduler.scheduling,
                "max_num_batched_tokens": e.cfg.step_tokens,
                "batching": BATCHING[state.scheduler.scheduling]}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)
