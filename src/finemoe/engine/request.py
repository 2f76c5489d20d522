"""A generation request and its lifecycle (tokens, stop conditions, metrics)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from finemoe.engine.metrics import RequestMetrics
from finemoe.engine.sampling import SamplingParams

_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    request_id: str = field(default_factory=new_request_id)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # "stop" | "length" | "cancelled"
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    _text: str = field(default="", repr=False)
    _text_tokens: int = field(default=0, repr=False)   # tokens `_text` was decoded from (-1: cut at a stop string)
    _decode: object = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The output text, decoded when asked (not on every token: the engine's hot loop never asks)."""
        if self._decode is not None and self._text_tokens not in (-1, len(self.output_ids)):
            self._text, self._text_tokens = self._decode(self.output_ids), len(self.output_ids)
        return self._text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def append(self, token: int, eos_ids: set[int], decode) -> None:
        """Add a sampled token and apply the stop rules: EOS (not kept), stop strings (cut), length."""
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.output_ids.append(token)
        self._decode = decode
        for s in self.params.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self._text, self._text_tokens = self._text[:cut], -1
                self.finish_reason = "stop"
                return
        if len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
