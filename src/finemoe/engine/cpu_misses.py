"""The host-CPU half of a hybrid MoE layer (`--miss-compute cpu|auto`): missed experts computed on the CPU from
the host expert store while the device copies and computes the rest.

A layer's misses are split in LayerSequence.begin (experts/miss_split.py); the cache acquires (copies) only the
device half. The device side of a hybrid layer is two ops over per-layer device buffers (on the layer's device):
  keep mask  [J] per layer (`keep`, 0 for the layer's CPU experts, 1 elsewhere): the device computes with
             top_k_weights * keep[top_k_index] (`device_weights`), so only its own half (the CPU experts'
             slot-table entries point at slot 0 of the window, whose weights are finite, times weight 0)
  CPU result [T, H]: the weighted sum of each token's CPU rows, added to the device half's output
             (`with_cpu_result`)
The host side is two calls:
  1. `start`: the (token, k) rows routed to CPU experts are found on the host (the routing is already there);
     their tokens' hidden states and top-k weights start copying to pinned host buffers on a side stream (the
     compute stream already waits for the demand copies), and the keep mask is written to the layer's device
     (each layer's keep row, side stream and result live on the device it computes on: one device, or its
     own under --non-expert-placement split)
  2. `finish`: HOST SYNC on those inputs only; the CPU half's kernel (--cpu-kernel, experts/cpu_kernel.py: the
     model's own eager experts function over a host view of the whole layer [J, ...] in the CPU half's weight
     dtype, --cpu-expert-dtype, experts/cpu_weights.py; or kt-kernel, experts/kt_experts.py) computes every CPU
     row, each as a one-expert token (so no skip index is needed: transformers v5's GPT-OSS eager function has
     none, the others skip index J); the rows' sums per token, [T, H] with zeros elsewhere, in the model's dtype,
     go to the device (pinned, non_blocking, on the compute stream) into the buffer the add reads.
  `timing` adds up the host's wall seconds in `start`, waiting for the inputs and computing.
Both the eager and the captured path run these same calls; they differ only in when the device ops run:
  eager (runtime.run_layer): start; the device half is issued (masked weights); finish into a fresh [T, H]
      buffer; the add. The CPU computes while the GPU copies and computes its half.
  CUDA graph (engine/graphs.py): the decode step's segment for layer l captures the mask and the add over
      static buffers: `keep` (allocated with this object) and a StaticResult per layer (allocated between
      captures, `runtime.allocate_static`). Between the replays that end at layer l's routing and run its
      experts, `run_static` does start and finish into the StaticResult (or, with no CPU experts, resets the
      keep row to ones and the result to zero, only if they are not already): the CPU computes while the
      demand copies are in flight, and the next segment, queued after the result's copy on the compute stream,
      waits for the demand copies through their events. The device half's compute does not overlap the CPU's
      here (it is in the next segment).
`gpu` mode captures neither op: its graphs are the plain ones.

Host buffer reuse: every pinned host buffer is preallocated per layer (the keep mask's row; the inputs' and the
result's buffers, grown when a layer needs more rows): allocating pinned memory on the hot path can wait on the
driver. Layer l's buffers are rewritten only at layer l's next visit. By then the host has read the inputs (after
their sync), and the copies from the keep row and the result buffer, queued on the compute stream, have finished:
a later routing sync (runtime._sync_routing_to_host, on the compute stream) or the iteration's sampling came after
them.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from finemoe.experts.cpu_kernel import CpuExpertKernel
from finemoe.experts.miss_split import MissCosts
from finemoe.models.adapters import MoELayer


@dataclass
class CpuJob:
    """One layer's CPU half between `start` and `finish`."""

    layer: int
    num_tokens: int               # T: the layer's tokens (rows of its output)
    row_tok: torch.Tensor         # [R] host: each CPU row's token in [0, T)
    row_token: torch.Tensor       # [R] host: each CPU row's position in the copied inputs
    row_k: torch.Tensor           # [R] host: each CPU row's top-k position
    row_expert: torch.Tensor      # [R, 1] host: each CPU row's expert
    hidden: torch.Tensor          # [U, H] host (pinned on CUDA; its copy is in flight until `ready`)
    weights: torch.Tensor         # [U, k] host
    ready: torch.cuda.Event | None


@dataclass
class StaticResult:
    """A captured layer's CPU result: out [T, H] on the device at a fixed address, read by the graph segment
    that computes the layer's experts; all zero unless `written`."""

    out: torch.Tensor
    written: bool = False


@dataclass
class CpuHalfTiming:
    """Host wall seconds of the CPU halves so far: starting them (`start`: rows found, input copies queued, keep mask
    written), waiting for their inputs (`finish`'s sync) and computing (through queueing the result's copy)."""

    layers: int = 0
    start_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0

    def report(self) -> dict:
        return {"cpu_half_layers": self.layers, "cpu_half_start_s": self.start_s, "cpu_half_wait_s": self.wait_s,
                "cpu_half_compute_s": self.compute_s}


def with_cpu_result(out: torch.Tensor, cpu_result: torch.Tensor) -> torch.Tensor:
    """The device half's output out [T, H] plus the CPU half's cpu_result [T, H] (zero rows add exactly 0)."""
    return out + cpu_result


class CpuMisses:
    """Computes missed experts on the host CPU (see the module docstring).

    `costs` is what the auto split charges a CPU miss: the start-up calibration's, with its CPU times scaled by
    `scale`, the running ratio of measured to predicted compute time of this process's CPU halves (an exponential
    mean over the layers that computed on the CPU, folded into `costs` every ADAPT_EVERY such layers). A cold expert
    under the engine's own load (copies reading host memory beside it, other host threads) can cost more than at
    start-up; the split follows what the CPU half actually takes."""

    ADAPT_EVERY = 16
    ADAPT_WEIGHT = 0.1

    def __init__(self, kernel: CpuExpertKernel, layers: list[MoELayer], devices: list[torch.device],
                 costs: MissCosts, scale: float = 1.0, adapt: bool = True) -> None:
        """kernel: what computes the CPU rows (experts/cpu_kernel.py); devices [L]: where each MoE layer computes
        (its keep mask and result live there; one device unless the layers are split); costs: the calibrated
        MissCosts; scale: the measured-to-predicted ratio to start from (an earlier configuration's); adapt: follow
        the measured times (off: `costs` as given, e.g. by tests that fix a split)."""
        self.base_costs, self.scale, self.adapt = costs, (scale if adapt else 1.0), adapt
        self.costs = self._scaled()
        self._since_adapt = 0
        self.cuda = devices[0].type == "cuda"
        self.kernel = kernel
        self.timing = CpuHalfTiming()
        self._host: dict[tuple[int, str], torch.Tensor] = {}   # (layer, kind) -> pinned host buffer (_host_buffer)
        J = layers[0].experts.num_experts
        self._keep_host = torch.ones((len(layers), J), dtype=torch.float32, pin_memory=self.cuda)   # [L, J]
        self._keep_np = self._keep_host.numpy()
        keeps = {dev: self._keep_host.to(dev) if self.cuda else self._keep_host for dev in set(devices)}
        self.keep = [keeps[dev][i] for i, dev in enumerate(devices)]   # [J] per layer on its device, fixed address
        self._keep_ones = np.ones(len(layers), dtype=bool)   # [L] whether keep[l] is all ones (as queued)
        self.sides = {dev: torch.cuda.Stream(dev) for dev in set(devices)} if self.cuda else {}   # input copies

    # ---- device ops (eager, or captured in a graph segment) --------------------------------------------
    def device_weights(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """top_k_weights [T, k] with layer `layer`'s CPU experts' entries zeroed (exact for the others: times 1)."""
        return top_k_weights * self.keep[layer][top_k_index].to(top_k_weights.dtype)

    # ---- host work -------------------------------------------------------------------------------------
    def start(self, layer: int, cpu: np.ndarray, topk: np.ndarray, live: np.ndarray | None, hidden: torch.Tensor,
              top_k_weights: torch.Tensor) -> CpuJob:
        """cpu [m >= 1] experts computed on the host; topk [T, k] the layer's routing on the host; live [T] bool or
        None; hidden [T, H] and top_k_weights [T, k] on the device, final (the routing's host sync came after
        them on the compute stream). Starts the copies of the CPU rows' inputs to the host and writes the keep
        mask."""
        t0 = time.perf_counter()
        T = topk.shape[0]
        on = np.isin(topk, cpu)                                              # [T, k]
        if live is not None:
            on &= live[:, None]
        row_tok, row_k = np.nonzero(on)                                      # [R] each
        tokens, row_token = np.unique(row_tok, return_inverse=True)          # [U], [R]
        whole = tokens.size == T                                             # every token (batch-1 decode): no gather
        ready = None
        if self.cuda:
            # The inputs go to the host on a side stream: the compute stream already waits for this layer's
            # demand copies (cache.acquire), and a copy queued there would wait too.
            with torch.cuda.stream(self.sides[hidden.device]):
                if whole:
                    src_h, src_w = hidden, top_k_weights
                else:
                    idx = torch.from_numpy(tokens).to(hidden.device)
                    src_h, src_w = hidden.index_select(0, idx), top_k_weights.index_select(0, idx)
                hidden_h = self._to_host(layer, "hidden", src_h)                      # [U, H]
                weights_h = self._to_host(layer, "weights", src_w)                    # [U, k]
                ready = torch.cuda.Event()
                ready.record(self.sides[hidden.device])
        elif whole:
            hidden_h, weights_h = hidden, top_k_weights
        else:
            idx = torch.from_numpy(tokens)
            hidden_h, weights_h = hidden.index_select(0, idx), top_k_weights.index_select(0, idx)
        self._write_keep(layer, cpu)
        self.timing.start_s += time.perf_counter() - t0
        return CpuJob(layer, T, torch.from_numpy(row_tok), torch.from_numpy(row_token), torch.from_numpy(row_k),
                      torch.from_numpy(topk[row_tok, row_k]).unsqueeze(1), hidden_h, weights_h, ready)

    def _host_buffer(self, layer: int, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Layer `layer`'s pinned host buffer `kind`, as a [shape] view: allocated once (grown when a layer needs
        more rows), so the hot path never waits on the pinned allocator (see the module docstring for reuse)."""
        buf = self._host.get((layer, kind))
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
            buf = torch.empty((max(shape[0], 1), *shape[1:]), dtype=dtype, pin_memory=self.cuda)
            self._host[(layer, kind)] = buf
        return buf[:shape[0]]

    def _to_host(self, layer: int, kind: str, t: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of t in layer `layer`'s buffer `kind`, in flight on the current stream."""
        return self._host_buffer(layer, kind, tuple(t.shape), t.dtype).copy_(t, non_blocking=True)

    def _write_keep(self, layer: int, cpu: np.ndarray) -> None:
        """keep[layer] <- 0 at `cpu` [m], 1 elsewhere (queued on the current stream; skipped when it is all ones
        already and m == 0)."""
        if cpu.size == 0 and self._keep_ones[layer]:
            return
        keep = self._keep_np[layer]
        keep[:] = 1.0
        keep[cpu] = 0.0
        if self.cuda:
            self.keep[layer].copy_(self._keep_host[layer], non_blocking=True)
        self._keep_ones[layer] = cpu.size == 0

    def _scaled(self) -> MissCosts:
        c = self.base_costs
        return dataclasses.replace(c, cpu_s=c.cpu_s * self.scale, cpu_token_s=c.cpu_token_s * self.scale)

    def _adapt(self, job: CpuJob, seconds: float) -> None:
        """One more CPU half measured: `seconds` computing job's rows, against the calibrated prediction."""
        _, tokens = np.unique(job.row_expert.numpy(), return_counts=True)          # [m] tokens per CPU expert
        c = self.base_costs
        predicted = c.cpu_s * tokens.size + c.cpu_token_s * float((tokens - 1).sum())
        if predicted <= 0.0:
            return
        self.scale += self.ADAPT_WEIGHT * (seconds / predicted - self.scale)
        self._since_adapt += 1
        if self._since_adapt >= self.ADAPT_EVERY:
            self._since_adapt = 0
            self.costs = self._scaled()

    def finish(self, job: CpuJob, into: torch.Tensor) -> torch.Tensor:
        """Compute the CPU rows and write their per-token sums into `into` [T, H] on the device (zero for tokens
        without CPU rows; the copy is queued on the current stream); returns `into`.
        HOST SYNC: the CPU rows' inputs (copied to the host in `start`)."""
        t0 = time.perf_counter()
        if job.ready is not None:
            job.ready.synchronize()
        t1 = time.perf_counter()
        x = job.hidden[job.row_token]                                        # [R, H]
        w = job.weights[job.row_token, job.row_k].unsqueeze(1)               # [R, 1]
        rows = self.kernel.compute(job.layer, x, job.row_expert, w)          # [R, H] weighted
        sums = self._host_buffer(job.layer, "sums", (job.num_tokens, rows.shape[1]), into.dtype).zero_()   # [T, H]
        sums.index_add_(0, job.row_tok, rows.to(into.dtype))
        out = into.copy_(sums, non_blocking=self.cuda)
        t, spent = self.timing, time.perf_counter() - t1
        t.layers, t.wait_s, t.compute_s = t.layers + 1, t.wait_s + t1 - t0, t.compute_s + spent
        if self.adapt:
            self._adapt(job, spent)
        return out

    def run_static(self, layer: int, cpu: np.ndarray, topk: np.ndarray, live: np.ndarray | None,
                   hidden: torch.Tensor, top_k_weights: torch.Tensor, result: StaticResult) -> None:
        """Between graph replays: the CPU half of layer `layer` (cpu [m] experts, maybe none) run to completion
        into the static buffers its captured segment reads, `keep[layer]` and `result`. HOST SYNC (m >= 1): the
        CPU rows' inputs."""
        if cpu.size == 0:
            self._write_keep(layer, cpu)
            if result.written:
                result.out.zero_()
                result.written = False
            return
        self.finish(self.start(layer, cpu, topk, live, hidden, top_k_weights), result.out)
        result.written = True
