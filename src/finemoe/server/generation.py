"""From a validated request to a queued engine job, and from its events to an OpenAI response or SSE stream.

Prompts are tokenized here, on the HTTP side, with the server's own copy of the tokenizer (the engine
thread keeps the original), so length limits are checked before anything is queued.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request as HTTPRequest

from finemoe.engine import SamplingParams
from finemoe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, usage
from finemoe.server.scheduler import Event, Job, QueueFull
from finemoe.server.textstream import IncrementalText

DISCONNECT_POLL_S = 0.25   # how often a waiting handler checks whether its client is still there


class ClientGone(Exception):
    """The HTTP client disconnected; its job has been cancelled."""


@dataclass
class Generation:
    chat: bool
    id: str
    created: int
    model: str
    job: Job
    prompt_tokens: int
    stop: tuple[str, ...]
    include_usage: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def submit(state, body: CompletionRequest | ChatCompletionRequest) -> Generation:
    """Validate against the served model, tokenize, check lengths, queue. Raises APIError."""
    if body.model != state.model_name:
        raise APIError(f"the model {body.model!r} does not exist: this server serves {state.model_name!r} "
                       "(see GET /v1/models)", status=404, param="model", code="model_not_found")
    chat = isinstance(body, ChatCompletionRequest)
    text, ids = _chat_prompt(state, body) if chat else _completion_prompt(state, body)
    limit = state.max_model_len
    if len(ids) >= limit:
        raise APIError(f"the prompt has {len(ids)} tokens but the server's max model length is {limit} "
                       f"(--max-model-len): shorten the prompt to at most {limit - 1} tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    room = limit - len(ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(state.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(f"'max_tokens' is {max_tokens} but the prompt's {len(ids)} tokens leave room for only {room} "
                       f"within the max model length {limit}: lower max_tokens to {room} or less",
                       param="max_tokens", code="context_length_exceeded")
    stop = body.stop_strings()
    params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)
    request = state.engine.make_request(ids, params)  # pure bookkeeping for token ids: safe off the engine thread
    request.prompt_text = text
    job = Job(request, asyncio.get_running_loop())
    try:
        state.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(str(e), status=429, type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(e.retry_after_s)}) from None
    state.metrics.prompt_tokens.inc(len(ids))
    prefix = "chatcmpl" if chat else "cmpl"
    return Generation(chat, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_name, job, len(ids),
                      stop, bool(body.stream_options and body.stream_options.include_usage))


def _completion_prompt(state, body: CompletionRequest) -> tuple[str | None, list[int]]:
    prompt = body.prompt_input()
    if isinstance(prompt, str):
        return prompt, state.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bad = [t for t in prompt if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(f"'prompt' holds token id {bad[0]}, outside this model's vocabulary [0, {state.vocab_size})",
                       param="prompt")
    return None, list(prompt)


def _chat_prompt(state, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    messages = body.template_messages()
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise APIError(f"the model {state.model_name!r} has no chat template (its tokenizer's chat_template is "
                       "unset), so chat requests cannot be formatted: use POST /v1/completions with a prompt "
                       "you format yourself", param="messages", code="no_chat_template")
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja raises for conversations the template rejects (e.g. roles out of order)
        raise APIError(f"the model's chat template rejected these messages: {e}", param="messages") from None
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError("'messages' formats to an empty prompt", param="messages")
    return text, ids


async def next_event(gen: Generation, http: HTTPRequest) -> Event:
    """The job's next event; cancels the job and raises ClientGone if the client disconnects meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(gen.job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                gen.job.cancel()
                raise ClientGone() from None


def _raise_for(event: Event) -> None:
    if event.finish_reason == "error":
        raise APIError(event.error or "the engine failed", status=500, type="server_error", code="engine_error")
    if event.finish_reason == "cancelled" and event.error:
        raise APIError(event.error, status=503, type="server_error", code="unavailable")


def _choice(gen: Generation, text: str, finish_reason: str | None) -> dict:
    if gen.chat:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def collect(gen: Generation, http: HTTPRequest) -> dict:
    """Wait for the job to finish and build the non-streamed response body."""
    try:
        event = await next_event(gen, http)
        while event.finish_reason is None:
            event = await next_event(gen, http)
    finally:
        if not gen.job.done:
            gen.job.cancel()
    _raise_for(event)
    return {"id": gen.id, "object": gen.object, "created": gen.created, "model": gen.model,
            "choices": [_choice(gen, event.text, event.finish_reason)],
            "usage": usage(gen.prompt_tokens, event.completion_tokens)}


def _chunk(gen: Generation, delta: str | None, finish_reason: str | None, first: bool = False) -> str:
    if gen.chat:
        d = {} if delta is None else ({"role": "assistant", "content": delta} if first else {"content": delta})
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
    obj = {"id": gen.id, "object": gen.object + (".chunk" if gen.chat else ""), "created": gen.created,
           "model": gen.model, "choices": [choice]}
    if gen.include_usage:
        obj["usage"] = None
    return _sse(obj)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(gen: Generation, http: HTTPRequest) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format: a chunk per generated token with its text delta, a final chunk with
    finish_reason, the usage chunk if stream_options.include_usage, then [DONE]."""
    text = IncrementalText(gen.stop)
    try:
        if gen.chat:
            yield _chunk(gen, "", None, first=True)
        while True:
            event = await next_event(gen, http)
            final = event.finish_reason is not None
            if final:
                try:
                    _raise_for(event)
                except APIError as e:
                    yield _sse(e.body())
                    break
            delta = text.delta(event.text, final)
            if delta or not final:   # one chunk per generated token (text "" while held back)
                yield _chunk(gen, delta, None)
            if final:
                yield _chunk(gen, None, event.finish_reason)
                if gen.include_usage:
                    yield _sse({"id": gen.id, "object": gen.object + (".chunk" if gen.chat else ""),
                                "created": gen.created, "model": gen.model, "choices": [],
                                "usage": usage(gen.prompt_tokens, event.completion_tokens)})
                break
        yield _sse("[DONE]")
    except ClientGone:
        return
    finally:
        if not gen.job.done:
            gen.job.cancel()
