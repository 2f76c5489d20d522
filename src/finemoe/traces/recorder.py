"""Record routing from the engine: a policy wrapper that sees every layer's LayerRouting.

`record` runs any routing-driven policy (`inner`, default lru) unchanged and, as a side effect, keeps
per request the routed token ids and, per token and layer, the top-k ids and full router softmax.
Prefill is recorded as one iteration holding every prompt token (padding dropped), each decode step
as one iteration of one token: exactly how the simulator replays a trace. The trace also keeps the model's
input-embedding row of every distinct routed token (finemoe's token semantics in the simulator).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from finemoe.errors import ConfigError, UnknownPolicyError
from finemoe.policies.base import (EvictionRank, IterationInfo, LayerRouting, Policy, PolicyContext, Prefetch,
                                   RequestInfo, register_policy, registry)
from finemoe.traces.format import Trace
from finemoe.traces.token_rows import embedding_rows


class _RequestLog:
    def __init__(self, info: RequestInfo) -> None:
        self.info = info
        self.prompt_len = 0
        self.tokens: list[np.ndarray] = []   # [T_i] per iteration
        self.topk: list[np.ndarray] = []     # [T_i, L, k]
        self.probs: list[np.ndarray] = []    # [T_i, L, J] fp16


@register_policy
class RecordingPolicy(Policy):
    name = "record"
    description = ("Runs policy `inner` (default lru) unchanged and records every request's routing for "
                   "`finemoe trace` (top-k ids and the full router softmax per token and layer).")
    needs_router_probs = True
    internal = True   # `finemoe trace` runs it; users pick the inner policy

    def __init__(self, inner: str = "lru", inner_options: dict[str, Any] | None = None, probs: bool = True) -> None:
        policies = registry()   # filled by importing finemoe.policies, which also registers this class
        if inner not in policies:
            raise UnknownPolicyError(f"record: unknown inner policy {inner!r}; "
                                     f"available: {', '.join(sorted(policies))}")
        self.inner = policies[inner](**(inner_options or {}))
        if self.inner.keeps_all_resident:
            raise ConfigError(f"record: inner policy {inner!r} keeps every expert resident, so the engine never "
                              "reports routing to it: record with a caching policy such as lru")
        self.needs_hidden_states = self.inner.needs_hidden_states
        self.keep_probs = bool(probs)
        self.logs: dict[str, _RequestLog] = {}
        self.order: list[str] = []

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.inner.bind(ctx)
        self.L = ctx.geometry.num_layers
        self._topk: list[np.ndarray | None] = [None] * self.L
        self._probs: list[np.ndarray | None] = [None] * self.L
        self._rows = np.zeros(0, np.int64)

    # ---- pass-through with recording ----------------------------------------------------------
    def on_request_start(self, req: RequestInfo) -> None:
        self.logs[req.request_id] = _RequestLog(req)
        self.order.append(req.request_id)
        self.inner.on_request_start(req)

    def on_request_end(self, req: RequestInfo) -> None:
        self.inner.on_request_end(req)

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        self._topk = [None] * self.L
        self._probs = [None] * self.L
        return self.inner.on_iteration_start(it)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.inner.on_access(layer, experts, counts)

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        self._topk[routing.layer] = routing.top_k_on_host()
        if self.keep_probs and routing.probs is not None:
            self._probs[routing.layer] = np.asarray(routing.probs).astype(np.float16)   # host: torch or numpy
        self._rows = routing.token_rows
        return self.inner.on_layer_routed(routing if self.inner.needs_router_probs else
                                          LayerRouting(routing.layer, routing.top_k, routing.token_rows, None,
                                                       routing.hidden))

    def on_iteration_end(self, it: IterationInfo) -> None:
        self.inner.on_iteration_end(it)
        if any(t is None for t in self._topk):
            raise RuntimeError("record: a layer's routing was not reported this iteration")
        topk = np.stack(self._topk, axis=1)                                  # [T, L, k]
        probs = np.stack(self._probs, axis=1) if self.keep_probs else None   # [T, L, J]
        tokens = it.input_ids.reshape(-1).cpu().numpy()                      # [T]
        for b, rid in enumerate(it.request_ids):
            sel = self._rows == b
            log = self.logs[rid]
            if it.is_prefill:
                log.prompt_len = int(sel.sum())
            log.tokens.append(tokens[sel])
            log.topk.append(topk[sel])
            if probs is not None:
                log.probs.append(probs[sel])

    def eviction_rank(self) -> EvictionRank | None:
        return self.inner.eviction_rank()

    def close(self) -> None:
        self.inner.close()

    # ---- result ------------------------------------------------------------------------------
    def to_trace(self, model: str, expert_bytes: int | None) -> Trace:
        """Every request that ran, in start order, as a Trace (requests that never ran are dropped)."""
        logs = [self.logs[r] for r in self.order if self.logs[r].tokens]
        if not logs:
            raise ConfigError("record: no request ran, so there is nothing to write")
        lengths = np.array([sum(t.size for t in log.tokens) for log in logs], np.int64)
        g = self.ctx.geometry
        token_ids = np.concatenate([np.concatenate(log.tokens) for log in logs]).astype(np.int32)
        embed_ids, embed_rows = (embedding_rows(self.ctx.embed, token_ids, self.ctx.device)
                                 if self.ctx.embed is not None else (None, None))
        return Trace(
            model=model, num_layers=g.num_layers, num_experts=g.num_experts, top_k=g.top_k,
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            prompt_lens=np.array([log.prompt_len for log in logs], np.int32),
            iterations=np.array([len(log.tokens) for log in logs], np.int32),
            token_ids=token_ids,
            topk=np.concatenate([np.concatenate(log.topk) for log in logs]),
            probs=np.concatenate([np.concatenate(log.probs) for log in logs]) if self.keep_probs else None,
            expert_bytes=expert_bytes, source=f"finemoe trace of {model}",
            request_ids=[log.info.request_id for log in logs], prompt_texts=[log.info.prompt_text for log in logs],
            embed_ids=embed_ids, embed_rows=embed_rows)
