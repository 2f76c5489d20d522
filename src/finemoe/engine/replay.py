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
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # T -> ids [L, T, k], probs [L, T, J]
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None
        engine.iteration_hooks.append(self._stage)
        # prepend: before the runtime's hook
        self._handles = [layer.router.register_forward_hook(self._hook(layer.index), prepend=True)
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
        self.engine.iteration_hooks.remove(self._stage)

    def _rows(self, it, token_rows: np.ndarray) -> np.ndarray:
        """Trace token index of every token in this forward pass [T]: prefill padding -> its row's first token;
        a finished row of a static batch (DEAD_ROW) -> trace row 0 (its experts are never loaded)."""
        T = token_rows.size
        out = np.zeros(T, dtype=np.int64)
        per_row = T // len(it.request_ids) if it.is_prefill else 1
        for b, (rid, step) in enumerate(zip(it.request_ids, it.steps)):
            start, stop = self.trace.iteration_rows(self.assigned[rid], step)
            if it.is_prefill:                                        # row b holds tokens [b*P, (b+1)*P), left-padded
                out[b * per_row:(b + 1) * per_row] = start
                out[(b + 1) * per_row - (stop - start):(b + 1) * per_row] = np.arange(start, stop)
            else:
                out[token_rows == b] = start
        return out

    def _stage(self, it, token_rows: np.ndarray) -> None:
        """Before each forward: copy this iteration's recorded routing into fixed device buffers, which the
        router hooks read (also from inside a captured CUDA graph, where the hooks do not run on the host)."""
        rows = self._rows(it, token_rows)
        T = rows.size
        if T not in self._buffers:
            L, k, J = self.trace.num_layers, self.trace.top_k, self.trace.num_experts
            dev = self.engine.device
            self._buffers[T] = (torch.zeros((L, T, k), dtype=torch.long, device=dev),
                                torch.full((L, T, J), 1.0 / J, dtype=torch.float32, device=dev))
        ids, probs = self._buffers[T]
        ids.copy_(torch.from_numpy(self.trace.topk[rows].astype(np.int64)).transpose(0, 1))           # [L, T, k]
        if self.trace.probs is not None:
            probs.copy_(torch.from_numpy(self.trace.probs[rows].astype(np.float32)).transpose(0, 1))  # [L, T, J]
        self._current = (ids, probs)

    def _hook(self, layer: int):
        def hook(module, args, output):
            ids, probs = (t[layer].to(output[0].device) for t in self._current)                    # [T, k], [T, J]
            weights = probs.gather(1, ids).to(output[1].dtype)                                        # [T, k]
            return (torch.log(probs.clamp_min(1e-9)).to(output[0].dtype), weights, ids)
        return hook
