"""One batch of requests through prefill and decode.

Rows are left-padded at prefill; each decode step feeds every live row one token, so decode steps of
concurrent requests share a forward pass. A row that finishes (EOS, stop string, length) or is
cancelled leaves the batch at the next step: a dynamic decoder drops its KV-cache row, a static (fast
path) decoder keeps computing it as a DEAD_ROW whose experts are never loaded. New requests join at
the next batch (the engine has no in-flight joining).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from finemoe.engine.request import Request
from finemoe.engine.runtime import DEAD_ROW
from finemoe.engine.sampling import RowSampler, sample_batch
from finemoe.policies.base import IterationInfo, RequestInfo


class BatchRunner:
    def __init__(self, engine, requests: list[Request]) -> None:
        self.engine = engine
        self.rows = list(requests)
        self.samplers = [self._sampler(r) for r in requests]
        self.decoder = None                             # chosen at prefill, for the rows still there
        self.slot_of_row: list[int] = []                # decoder batch row of each live row
        self.width = 0                                  # decoder batch rows
        self.last: torch.Tensor | None = None           # [width, 1] last token ids
        self.step_no = 0
        for r in requests:
            engine.policy.on_request_start(RequestInfo(r.request_id, r.prompt_ids, r.prompt_text))

    def _sampler(self, r: Request) -> RowSampler:
        return RowSampler.for_params(r.params, self.engine.device)

    @property
    def done(self) -> bool:
        return not self.rows

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int | None]]:
        """Run one iteration; return (request, new token or None if it stopped without one) per row that
        produced output. Finished rows are retired afterwards."""
        self._retire()
        if not self.rows:
            return []
        dev = self.engine.device
        prefill = self.step_no == 0
        if prefill:
            self.decoder = self.engine.decoder_for(self.rows)
            self.width, self.slot_of_row = len(self.rows), list(range(len(self.rows)))
            ids, mask = self._pad([r.prompt_ids for r in self.rows], dev)
            token_rows = np.where(mask.cpu().numpy().reshape(-1) > 0,
                                  np.repeat(np.arange(len(self.rows)), ids.shape[1]), -1)
        else:
            token_rows = np.full(self.width, DEAD_ROW, dtype=np.int64)
            token_rows[self.slot_of_row] = np.arange(len(self.rows))
        live = None if len(self.rows) == self.width else torch.tensor(self.slot_of_row, device=dev)
        it_ids = ids if prefill else (self.last if live is None else self.last[live])      # [B, T] live rows
        it = IterationInfo(self.engine.next_iteration_index(), [r.request_id for r in self.rows],
                           [len(r.output_ids) for r in self.rows], it_ids, prefill)
        if prefill:
            logits = self.decoder.prefill(it, token_rows, ids, mask)                  # [width, V]
        else:
            logits = self.decoder.decode(it, token_rows, self.last)                   # [width, V]
        if live is not None:
            logits = logits[live]                                                     # [B, V] live rows
        next_ids = sample_batch(logits, self.samplers)
        tokens = self._sync_tokens_to_host(next_ids)
        now = time.perf_counter()
        stats = self.engine.runtime.end_iteration()
        if live is not None:
            self.last[live] = next_ids.view(-1, 1)
        else:
            self.last = next_ids.view(-1, 1)
        out = []
        share = 1.0 / len(self.rows)
        for i, (r, t) in enumerate(zip(self.rows, tokens)):
            m = r.metrics
            m.hits += int(stats.row_hits[i])
            m.misses += int(stats.row_misses[i])
            m.cpu_experts += int(stats.row_cpu[i])
            m.bytes_copied += stats.bytes_copied * share
            m.stall_s += stats.stall_s * share
            if r.finished:
                continue
            n_before = len(r.output_ids)
            r.append(t, self.engine.eos_ids, self.engine.decode)
            if len(r.output_ids) > n_before:
                m.on_token(now)
            out.append((r, t if len(r.output_ids) > n_before else None))
        self.step_no += 1
        return out

    @staticmethod
    def _sync_tokens_to_host(next_ids: torch.Tensor) -> list[int]:
        """HOST SYNC (one per iteration): the sampled tokens."""
        return next_ids.tolist()

    def _pad(self, seqs: list[list[int]], dev) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.engine.pad_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
        return ids.to(dev), mask.to(dev)

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        for i, r in enumerate(self.rows):
            if i not in keep:
                self.engine.policy.on_request_end(RequestInfo(r.request_id, r.prompt_ids, r.prompt_text))
        if keep and self.step_no > 0:
            if self.decoder.fixed_batch:
                self.slot_of_row = [self.slot_of_row[i] for i in keep]
            else:
                self.decoder.retire(keep)
                self.last = self.last[torch.tensor(keep, device=self.engine.device)]
                self.width = len(keep)
                self.slot_of_row = list(range(len(keep)))
        self.rows = [self.rows[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]
