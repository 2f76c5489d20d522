"""The host-CPU half of a hybrid MoE layer (`--miss-compute cpu|auto`): missed experts computed on the CPU from
the host expert store while the device copies and computes the rest.

A layer's misses are split in LayerSequence.begin (experts/miss_split.py); the cache acquires (copies) only the
device half. For the CPU half, runtime.run_layer (eager path) does, in this order:
  1. `start`: the (token, k) rows routed to CPU experts are found on the host (the routing is already there);
     their tokens' hidden states and top-k weights start copying to pinned host buffers on a side stream (the
     compute stream already waits for the demand copies), and the layer's keep mask [J] (0 for CPU
     experts) goes to the device
  2. `device_weights`: top_k_weights times the keep mask gathered by top_k_index: the device computes only
     its own half (the CPU experts' slot-table entries point at slot 0 of the window, whose weights are
     finite, times weight 0)
  3. the device half is issued (copies and compute run on the GPU from here on)
  4. `finish`: HOST SYNC on the hidden states' copy only; the CPU computes every CPU row with the model's own
     eager experts function over a host view of the whole layer [J, ...], each row as a one-expert token (so
     no skip index is needed: transformers v5's GPT-OSS eager function has none, the others skip index J);
     the rows' sums per token go back (pinned, non_blocking) and are added to the device output.
The CPU half therefore overlaps the copy engine and the device's compute; the layer waits for the slower.

CUDA graphs: a layer with CPU experts needs host work (the CPU compute) between the router and the layer's
output, which a captured decode graph cannot hold. With `--miss-compute cpu|auto` decode runs eagerly on the
static-KV fast path (engine/paths.py `graphs_allowed`); `gpu` mode keeps its graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finemoe.experts.hook import SlotExperts, eager_compute_fn
from finemoe.experts.host_store import HostExpertStore
from finemoe.models.adapters import MoELayer


@dataclass
class CpuJob:
    """One layer's CPU half between `start` and `finish`."""

    layer: int
    tokens: torch.Tensor          # [U] device: tokens with at least one CPU row
    row_token: torch.Tensor       # [R] host: each CPU row's position in `tokens`
    row_k: torch.Tensor           # [R] host: each CPU row's top-k position
    row_expert: torch.Tensor      # [R, 1] host: each CPU row's expert
    hidden: torch.Tensor          # [U, H] host (pinned on CUDA; its copy is in flight until `ready`)
    weights: torch.Tensor         # [U, k] host
    ready: torch.cuda.Event | None


class CpuMisses:
    """Computes missed experts on the host CPU (see the module docstring)."""

    def __init__(self, store: HostExpertStore, layers: list[MoELayer], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.views = [SlotExperts(layer.experts, store.tensors[layer.index]) for layer in layers]   # [J, ...] host
        self.fns = [eager_compute_fn(layer.experts) for layer in layers]
        J = store.geometry.num_experts
        self._keep_host = torch.ones((len(layers), J), dtype=torch.float32, pin_memory=self.cuda)   # [L, J]
        self._keep_np = self._keep_host.numpy()
        self._keep_dev = self._keep_host.to(device) if self.cuda else self._keep_host
        self.side = torch.cuda.Stream(device) if self.cuda else None      # the CPU half's input copies

    def start(self, layer: int, cpu: np.ndarray, topk: np.ndarray, live: np.ndarray | None, hidden: torch.Tensor,
              top_k_weights: torch.Tensor) -> CpuJob:
        """cpu [m] experts computed on the host; topk [T, k] the layer's routing on the host; live [T] bool or None.
        Starts the copies of the CPU rows' inputs to the host and of the keep mask to the device."""
        on = np.isin(topk, cpu)                                              # [T, k]
        if live is not None:
            on &= live[:, None]
        row_tok, row_k = np.nonzero(on)                                      # [R] each
        tokens, row_token = np.unique(row_tok, return_inverse=True)          # [U], [R]
        ready = None
        if self.cuda:
            # The inputs go to the host on a side stream: the compute stream already waits for this layer's
            # demand copies (cache.acquire), and a copy queued there would wait too. No event is needed: the
            # routing's host sync (runtime._sync_routing_to_host) means `hidden` and the weights are final.
            with torch.cuda.stream(self.side):
                idx = torch.from_numpy(tokens).to(self.device)
                hidden_h = self._to_host(hidden.index_select(0, idx))        # [U, H]
                weights_h = self._to_host(top_k_weights.index_select(0, idx))   # [U, k]
                ready = torch.cuda.Event()
                ready.record(self.side)
            idx.record_stream(torch.cuda.current_stream(self.device))       # read there too, by `finish`
        else:
            idx = torch.from_numpy(tokens)
            hidden_h, weights_h = hidden.index_select(0, idx), top_k_weights.index_select(0, idx)
        keep = self._keep_np[layer]
        keep[:] = 1.0
        keep[cpu] = 0.0
        if self.cuda:
            self._keep_dev[layer].copy_(self._keep_host[layer], non_blocking=True)
        return CpuJob(layer, idx, torch.from_numpy(row_token), torch.from_numpy(row_k),
                      torch.from_numpy(topk[row_tok, row_k]).unsqueeze(1), hidden_h, weights_h, ready)

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of t, in flight on the current stream."""
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def device_weights(self, job: CpuJob, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """top_k_weights [T, k] with the CPU experts' entries zeroed (exact for the others: times 1)."""
        return top_k_weights * self._keep_dev[job.layer][top_k_index].to(top_k_weights.dtype)

    def finish(self, job: CpuJob, out: torch.Tensor) -> torch.Tensor:
        """Compute the CPU rows and add them into the device half's output out [T, H] (in place; returned).
        HOST SYNC: the CPU rows' inputs (copied to the host in `start`)."""
        if job.ready is not None:
            job.ready.synchronize()
        x = job.hidden[job.row_token]                                        # [R, H]
        w = job.weights[job.row_token, job.row_k].unsqueeze(1)               # [R, 1]
        rows = self.fns[job.layer](self.views[job.layer], x, job.row_expert, w)   # [R, H] weighted
        sums = torch.zeros(job.hidden.shape, dtype=out.dtype, pin_memory=self.cuda)     # [U, H]
        sums.index_add_(0, job.row_token, rows.to(out.dtype))
        return out.index_add_(0, job.tokens, sums.to(self.device, non_blocking=True))
