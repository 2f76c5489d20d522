"""Routing replay: run the model with recorded routing in place of its router's choice.

For latency measurements at real scale, where only random-weight models fit the machine and random
routers choose almost uniformly: the engine computes with a real-size model while the experts it
loads follow a recorded trace of a trained model (same J and k; use the trace's number of layers).
A forward hook on each router (PyTorch's public hook API) replaces its `(logits, weights, indices)`
output with the recorded top-k ids, their recorded probabilities as weights, and log-probabilities as
logits (so policies that read the full softmax see the recorded one). Outputs are NOT the model's
own in this mode: it exists for timing, and says so.
"""
from __future__ import annotations

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.traces.format import Trace


class RoutingReplay:
    """Bind engine request ids to trace requests with `assign`; the hooks read the runtime's current
    iteration (request ids, steps, token rows) to pick the recorded rows of every routed token."""

    def __init__(self, engine, trace: Trace) -> None:
        g = engine.geometry
        if (trace.num_layers, trace.num_experts, trace.top_k) != (g.num_layers, g.num_experts, g.top_k):
            raise ConfigError(f"trace geometry L={trace.num_layers} J={trace.num_experts} k={trace.top_k} does not "
                              f"match the model's L={g.num_layers} J={g.num_experts} k={g.top_k}")
        self.engine, self.trace = engine, trace
        self.assigned: dict[str, int] = {}
        self._handles = [layer.router.register_forward_hook(self._hook(layer.index), prepend=True)  # before the runtime's hook
                         for layer in engine.layers]

    def assign(self, request_id: str, trace_index: int) -> None:
        self.assigned[request_id] = trace_index

    def request_for(self, trace_index: int, params):
        """An engine request whose prompt and length reproduce trace request `trace_index`."""
        import dataclasses
        iters = int(self.trace.iterations[trace_index])
        req = self.engine.make_request(self.trace.prompt_ids(trace_index),
                                       dataclasses.replace(params, max_new_tokens=iters, ignore_eos=True))
        self.assign(req.request_id, trace_index)
        return req

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _rows(self) -> np.ndarray:
        """Trace token index of every token in the current forward pass [T] (padding -> the row's first token)."""
        it = self.engine.runtime.current_iteration
        token_rows = self.engine.runtime.current_token_rows
        T = token_rows.size
        per_row = T // len(it.request_ids)
        out = np.empty(T, dtype=np.int64)
        for b, (rid, step) in enumerate(zip(it.request_ids, it.steps)):
            r = self.assigned[rid]
            start, stop = self.trace.iteration_rows(r, step)
            n = stop - start
            out[b * per_row:(b + 1) * per_row] = start                 # left padding
            out[(b + 1) * per_row - n:(b + 1) * per_row] = np.arange(start, stop)
        return out

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits = output[0]
            rows = self._rows()
            ids = torch.from_numpy(self.trace.topk[rows, layer].astype(np.int64)).to(logits.device)    # [T, k]
            if self.trace.probs is not None:
                probs = torch.from_numpy(self.trace.probs[rows, layer].astype(np.float32)).to(logits.device)  # [T, J]
            else:
                probs = torch.full((rows.size, self.trace.num_experts), 1.0 / self.trace.num_experts,
                                   device=logits.device)
            weights = probs.gather(1, ids).to(output[1].dtype)                                        # [T, k]
            return (torch.log(probs.clamp_min(1e-9)).to(logits.dtype), weights, ids)
        return hook
