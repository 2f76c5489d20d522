"""Continuous batching: requests join and leave the running batch at every step, prompts prefill in chunks.

Each running request holds one row (slot) of a `SlotKV` (engine/slot_kv.py) from admission to its end; its
tokens sit at positions 0.. of that row. A step (`ContinuousBatch.step`) is one forward pass over slot rows
[0, B) (B: the smallest bucket, a power of two up to max_batch_size, that covers every row in use):

    decode      every running request whose prompt is in the cache feeds its last token (one token each);
    prefill     requests still prefilling, in admission order, feed their next prompt chunk while the step's
                token budget (max_num_batched_tokens, decode tokens counted first) lasts; a request whose
                prompt completes samples its first token in this step.

Tokens are right-aligned in the step's [B, T] input (T = the longest chunk, 1 for a decode-only step), so the
last column is every row's last token and one `logits_to_keep=1` serves all; unused columns write to the
cache's TRASH column and are DEAD_ROW to the offload runtime (their experts are never loaded). A decode-only
step reads and writes fixed-address buffers only: on CUDA it is captured once per row bucket
(graphs.SegmentedGraph) and replayed; steps with prefill work run eagerly.

A request that finishes or is cancelled frees its row at once: `has_room`, `done` and `step` retire it first
(`policy.on_request_end`);
`admit` fills free rows (lowest first, `policy.on_request_start`). Who is admitted when is the caller's FCFS
queue (server/scheduler.py, `Engine.run_continuous`): `has_room()` says whether another request can start now.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from finemoe.engine.graphs import SegmentedGraph
from finemoe.engine.request import Request
from finemoe.engine.runtime import DEAD_ROW
from finemoe.engine.sampling import RowSampler, sample_batch
from finemoe.engine.slot_kv import SlotKV, attention_masks, layer_windows, num_attention_layers
from finemoe.models.kv_cache import cache_kwargs
from finemoe.policies.base import IterationInfo, RequestInfo

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A request in its KV row."""

    request: Request
    row: int
    order: int              # admission order (FCFS among prefills)
    sampler: RowSampler
    cached: int = 0         # tokens whose keys and values are in the row (its next position)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)

    def info(self) -> RequestInfo:
        r = self.request
        return RequestInfo(r.request_id, r.prompt_ids, r.prompt_text)


@dataclass
class StepPlan:
    """What one step feeds: per participating row, its tokens (right-aligned) and whether it samples."""

    rows: list[Running]           # participants, ascending row
    tokens: list[list[int]]       # their tokens this step
    samples: list[bool]           # whether the row samples a token at the step's end
    width: int                    # B: slot rows the forward covers
    prefill: bool                 # any prompt chunk in the step


class DecodeGraphs:
    """A decode-only step's fixed buffers per row bucket, and (CUDA) its captured graph."""

    def __init__(self, batch: ContinuousBatch, width: int) -> None:
        dev = batch.engine.device
        self.batch = batch
        self.ids = torch.zeros((width, 1), dtype=torch.long, device=dev)          # [B, 1]
        self.write = torch.zeros((width, 1), dtype=torch.long, device=dev)        # [B, 1]
        self.graph: SegmentedGraph | None = None
        self.runtime = None                                                     # the runtime the graph serves
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def step(self) -> torch.Tensor:
        """One decode step from the fixed buffers -> logits [B, V]. Capturable: no host sync."""
        return self.batch.forward(self.ids, self.write)


def _bucket(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)


class ContinuousBatch:
    def __init__(self, engine, max_num_batched_tokens: int | None = None) -> None:
        self.engine = engine
        self.max_rows = engine.cfg.max_batch_size
        self.budget = max_num_batched_tokens or engine.cfg.step_tokens
        self.kv = SlotKV(num_attention_layers(engine.model), self.max_rows, 1, engine.device)
        self.windows = layer_windows(engine.model)
        self.additive = getattr(engine.model.config, "_attn_implementation", "sdpa") == "eager"
        self.dtype = engine.model.dtype
        self.slots: list[Running | None] = [None] * self.max_rows
        self.graphs: dict[int, DecodeGraphs] = {}
        self._order = itertools.count()
        self._graph_failure: str | None = None

    # ---- admission ------------------------------------------------------------------------------
    @property
    def running(self) -> list[Running]:
        return [s for s in self.slots if s is not None]

    @property
    def done(self) -> bool:
        """No request holds a row (finished or cancelled ones are retired first)."""
        self._retire()
        return not self.running

    def has_room(self) -> bool:
        """A free row, and token budget left this step after the decodes and the admitted prompts' rest. A row
        whose request has finished or was cancelled is free (retired here)."""
        self._retire()
        run = self.running
        if len(run) >= self.max_rows:
            return False
        owed = sum(len(s.request.prompt_ids) - s.cached if s.prefilling else 1 for s in run)
        return owed < self.budget

    def admit(self, request: Request) -> None:
        """Give `request` the lowest free row; it starts prefilling at the next step."""
        row = self.slots.index(None)
        need = len(request.prompt_ids) + request.params.max_new_tokens
        if self.kv.grow(need):
            self.drop_graphs()
        self.slots[row] = Running(request, row, next(self._order), self._sampler(request))
        self.engine.policy.on_request_start(self.slots[row].info())

    def _sampler(self, r: Request) -> RowSampler:
        return RowSampler.for_params(r.params, self.engine.device)

    def abort(self) -> None:
        """End every row (after an engine failure: their state is not to be trusted); the batch is empty after."""
        for i, s in enumerate(self.slots):
            if s is not None:
                s.request.cancel()
                self.engine.policy.on_request_end(s.info())
                self.slots[i] = None

    def _retire(self) -> None:
        for i, s in enumerate(self.slots):
            if s is not None and s.request.finished:
                self.engine.policy.on_request_end(s.info())
                self.slots[i] = None

    # ---- one step -------------------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        run = self.running
        if not run:
            return None
        budget = self.budget - sum(not s.prefilling for s in run)
        chunks: dict[int, int] = {}
        for s in sorted((s for s in run if s.prefilling), key=lambda s: s.order):
            n = min(len(s.request.prompt_ids) - s.cached, budget)
            if n <= 0:
                break
            chunks[s.row] = n
            budget -= n
        rows, tokens, samples = [], [], []
        for s in run:
            if s.prefilling and s.row not in chunks:
                continue
            if s.prefilling:
                n = chunks[s.row]
                tokens.append(s.request.prompt_ids[s.cached:s.cached + n])
                samples.append(s.cached + n == len(s.request.prompt_ids))
            else:
                tokens.append([s.request.output_ids[-1]])
                samples.append(True)
            rows.append(s)
        width = _bucket(max(s.row for s in run) + 1, self.max_rows)
        return StepPlan(rows, tokens, samples, width, bool(chunks))

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int | None]]:
        """Retire finished rows, run one iteration of the running ones; return (request, new token or None if
        it stopped without one) per row that sampled."""
        self._retire()
        plan = self.plan()
        if plan is None:
            return []
        T = max(len(t) for t in plan.tokens)
        ids = np.full((plan.width, T), self.engine.pad_id, dtype=np.int64)          # [B, T]
        write = np.full((plan.width, T), self.kv.trash, dtype=np.int64)            # [B, T]
        token_rows = np.full((plan.width, T), DEAD_ROW, dtype=np.int64)           # [B, T]
        for i, (s, toks) in enumerate(zip(plan.rows, plan.tokens)):
            n = len(toks)
            ids[s.row, T - n:] = toks
            write[s.row, T - n:] = np.arange(s.cached, s.cached + n)
            token_rows[s.row, T - n:] = i
        rows_ids = torch.from_numpy(ids[[s.row for s in plan.rows]]).to(self.engine.device)        # [P, T]
        it = IterationInfo(self.engine.next_iteration_index(), [s.request.request_id for s in plan.rows],
                           [len(s.request.output_ids) for s in plan.rows], rows_ids, plan.prefill,
                           [len(t) for t in plan.tokens] if plan.prefill else None)
        if plan.prefill:
            ids_t, write_t = (torch.from_numpy(a).to(self.engine.device) for a in (ids, write))
            logits = self.engine.iterate(it, token_rows.reshape(-1), lambda: self.forward(ids_t, write_t))
        else:
            logits = self._decode(it, token_rows.reshape(-1), ids, write)
        sampling = [i for i, s in enumerate(plan.samples) if s]
        tokens = []
        if sampling:   # (a step of unfinished prompt chunks only samples nothing)
            pick = torch.tensor([plan.rows[i].row for i in sampling], dtype=torch.long, device=logits.device)
            next_ids = sample_batch(logits[pick], [plan.rows[i].sampler for i in sampling])     # [n]
            tokens = self._sync_tokens_to_host(next_ids)
        now = time.perf_counter()
        stats = self.engine.runtime.end_iteration()
        out = []
        share = 1.0 / len(plan.rows)
        for i, (s, toks) in enumerate(zip(plan.rows, plan.tokens)):
            s.cached += len(toks)
            m = s.request.metrics
            m.hits += int(stats.row_hits[i])
            m.misses += int(stats.row_misses[i])
            m.cpu_experts += int(stats.row_cpu[i])
            m.bytes_copied += stats.bytes_copied * share
            m.stall_s += stats.stall_s * share
        for i, t in zip(sampling, tokens):
            r = plan.rows[i].request
            if r.finished:            # cancelled during the step
                continue
            n_before = len(r.output_ids)
            r.append(t, self.engine.eos_ids, self.engine.decode)
            if len(r.output_ids) > n_before:
                r.metrics.on_token(now)
            out.append((r, t if len(r.output_ids) > n_before else None))
        return out

    @staticmethod
    def _sync_tokens_to_host(next_ids: torch.Tensor) -> list[int]:
        """HOST SYNC (one per iteration): the sampled tokens."""
        return next_ids.tolist()

    def forward(self, ids: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """ids, write [B, T] on the device -> the last column's logits [B, V]. Device ops only (capturable)."""
        kv = self.kv
        kv.write = write
        masks = attention_masks(write, kv.length, self.windows, self.dtype, self.additive)
        pos = torch.where(write == kv.trash, 0, write)                                     # [B, T]
        out = self.engine.model(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=True,
                                logits_to_keep=1, **cache_kwargs(self.engine.model, kv))
        return out.logits[:, -1, :]

    # ---- decode-only steps: fixed buffers, CUDA graphs ----------------------------------------------
    def _decode(self, it, token_rows: np.ndarray, ids: np.ndarray, write: np.ndarray) -> torch.Tensor:
        width = ids.shape[0]
        g = self.graphs.get(width)
        if g is None:
            g = self.graphs[width] = DecodeGraphs(self, width)
        g.ids.copy_(torch.from_numpy(ids))
        g.write.copy_(torch.from_numpy(write))
        if not self._graphs_allowed(width):
            return self.engine.iterate(it, token_rows, g.step)
        if g.graph is not None and g.runtime is self.engine.runtime:
            return self.engine.iterate(it, token_rows, g.graph.replay)
        dev = self.engine.device
        with torch.cuda.stream(g.stream):   # eager first step on the capture stream (warms it up)
            g.stream.wait_stream(torch.cuda.current_stream(dev))
            logits = self.engine.iterate(it, token_rows, g.step).clone()
        torch.cuda.current_stream(dev).wait_stream(g.stream)
        self._capture(g)
        return logits

    def _graphs_allowed(self, width: int) -> bool:
        return self._graph_failure is None and self.engine.paths.graphs_allowed(width)

    def _capture(self, g: DecodeGraphs) -> None:
        graph = SegmentedGraph(self.engine.runtime)
        try:
            graph.capture(g.step, g.stream)
        except Exception as e:  # noqa: BLE001  a model we cannot capture still runs, eagerly
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self._graph_failure = f"{type(e).__name__}: {e}"
            self.drop_graphs()
            return
        g.graph, g.runtime = graph, self.engine.runtime

    def drop_graphs(self) -> None:
        for g in self.graphs.values():
            g.graph = None
