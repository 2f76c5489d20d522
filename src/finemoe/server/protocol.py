"""OpenAI wire format: request models (strictly typed), unsupported-parameter checks and error bodies.

Every client mistake becomes an `APIError`, which the app renders as OpenAI's error object
{"error": {"message", "type", "param", "code"}} with the right HTTP status and no traceback.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from finemoe.errors import FineMoEError


class APIError(FineMoEError):
    """A request the server refuses; `status` is the HTTP status, `type`/`code` follow OpenAI's names."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers      # extra response headers (Retry-After on 429)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Parameters of OpenAI's API that finemoe does not implement, with the value(s) that mean "not used".
# Sending one with any other value is refused by name; anything not listed and not a field is unknown.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False), "store": (False,),
    "metadata": ({},), "service_tier": ("auto", "default"), "modalities": (["text"],),
    "reasoning_effort": (), "audio": (), "prediction": (), "web_search_options": (),
}
_WHY = {"n": "one choice is returned per request", "best_of": "one choice is returned per request",
        "tools": "tool calling is not implemented", "tool_choice": "tool calling is not implemented",
        "functions": "function calling is not implemented", "function_call": "function calling is not implemented"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. `ignore_eos` is an extension (as in vLLM): always generate max_tokens."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(f"'stop' has {len(stops)} strings; at most 4 are allowed", param="stop")
        if any(s == "" for s in stops):
            raise APIError("'stop' strings must not be empty", param="stop")
        return tuple(stops)

    def check_ranges(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise APIError(f"'temperature' is {self.temperature}; it must be in [0, 2]", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise APIError(f"'top_p' is {self.top_p}; it must be in (0, 1]", param="top_p")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise APIError(f"'max_tokens' is {self.max_tokens}; it must be at least 1", param="max_tokens")
        if self.stream_options is not None and not self.stream:
            raise APIError("'stream_options' is only allowed with 'stream': true", param="stream_options")


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a list holding one string."""

    prompt: str | list[int] | list[str]

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(f"'prompt' holds {len(p)} prompts; send one prompt per request", param="prompt")
            p = p[0]
        if len(p) == 0:
            raise APIError("'prompt' is empty: send at least one character or token id", param="prompt")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def template_messages(self) -> list[dict]:
        if not self.messages:
            raise APIError("'messages' is empty: send at least one message", param="messages")
        return [m.as_template_dict() for m in self.messages]

    def check_ranges(self) -> None:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise APIError("'max_tokens' and 'max_completion_tokens' disagree; send one of them",
                               param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        super().check_ranges()


def parse_body(raw: bytes, model_cls: type[_Sampling]) -> _Sampling:
    """Raw request body -> validated request model, or an APIError naming the problem."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(f"'{where}': {err['msg']}{more}", param=where or None) from None
    _refuse_extras(req.model_extra or {})
    req.check_ranges()
    return req


def _refuse_extras(extra: dict[str, Any]) -> None:
    for name, value in extra.items():
        if name not in _NEUTRAL:
            raise APIError(f"unrecognized request argument {name!r}", param=name, code="unrecognized_argument")
        if value is None or value in _NEUTRAL[name]:
            continue
        why = _WHY.get(name, "finemoe does not implement it")
        raise APIError(f"parameter {name!r}={value!r} is not supported ({why}); omit it", param=name,
                       code="unsupported_parameter")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
