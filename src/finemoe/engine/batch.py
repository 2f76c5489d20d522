"""One batch of requests through prefill and decode.

Rows are left-padded at prefill; each decode step feeds every live row one token, so decode steps of
concurrent requests share a forward pass. A row that finishes (EOS, stop string, length) or is
cancelled leaves the batch at the next step: its KV-cache row is dropped. New requests join at the
next batch (the engine has no in-flight joining).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from finemoe.engine.request import Request
from finemoe.engine.sampling import RowSampler, sample_batch
from finemoe.policies.base import IterationInfo, RequestInfo


class BatchRunner:
    def __init__(self, engine, requests: list[Request]) -> None:
        self.engine = engine
        self.rows = list(requests)
        self.samplers = [self._sampler(r) for r in requests]
        self.cache = None
        self.mask: torch.Tensor | None = None       # [B, S] attention mask so far
        self.positions: torch.Tensor | None = None  # [B, 1] position of the last token
        self.last: torch.Tensor | None = None       # [B, 1] last token ids
        self.step_no = 0
        for r in requests:
            engine.policy.on_request_start(RequestInfo(r.request_id, r.prompt_ids, r.prompt_text))

    def _sampler(self, r: Request) -> RowSampler:
        gen = None
        if not r.params.greedy:
            gen = torch.Generator(device=self.engine.device)
            gen.manual_seed(r.params.seed if r.params.seed is not None else int(time.time_ns() % (2**31)))
        return RowSampler(r.params, gen)

    @property
    def done(self) -> bool:
        return not self.rows

    def step(self) -> list[tuple[Request, int | None]]:
        """Run one iteration; return (request, new token or None if it stopped without one) per row that
        produced output. Finished rows are retired afterwards."""
        self._retire()
        if not self.rows:
            return []
        dev = self.engine.device
        if self.cache is None:
            ids, self.mask = self._pad([r.prompt_ids for r in self.rows], dev)
            pos = (self.mask.cumsum(-1) - 1).clamp(min=0)                       # [B, S]
            token_rows = np.where(self.mask.cpu().numpy().reshape(-1) > 0,
                                  np.repeat(np.arange(len(self.rows)), ids.shape[1]), -1)
        else:
            ids = self.last
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            pos = self.positions + 1
            token_rows = np.arange(len(self.rows))
        it = IterationInfo(self.engine.next_iteration_index(), [r.request_id for r in self.rows],
                           [len(r.output_ids) for r in self.rows], ids, self.cache is None)
        logits = self.engine.forward(it, token_rows, ids, self.mask, pos, self)  # [B, V]
        next_ids = sample_batch(logits, self.samplers)
        tokens = self._sync_tokens_to_host(next_ids)
        now = time.perf_counter()
        stats = self.engine.runtime.end_iteration()
        self.positions = pos[:, -1:]
        self.last = next_ids.view(-1, 1)
        out = []
        share = 1.0 / len(self.rows)
        for i, (r, t) in enumerate(zip(self.rows, tokens)):
            m = r.metrics
            m.hits += int(stats.row_hits[i])
            m.misses += int(stats.row_misses[i])
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
        if keep and self.cache is not None:
            idx = torch.tensor(keep, device=self.engine.device)
            self.cache.batch_select_indices(idx)
            self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        self.rows = [self.rows[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]

    def cancel_all(self) -> None:
        for r in self.rows:
            r.cancel()
        self._retire()
