"""The oracle's view of a recorded trace: every key's uses on one timeline of steps."""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from finemoe.policies.oracle.belady import Timeline
from finemoe.traces.format import Trace


class FutureIndex:
    """The trace as one timeline of steps, step = (request, iteration, layer) in trace order:
    step(r, i, l) = base[r] + i * L + l. Two sorted code arrays answer the oracle's questions:
      by_key  = key * S1 + step   -> next use of any key after a step (one searchsorted, vectorised)
      by_step = step * K + key    -> the keys a range of steps needs, in need order (next_by_step: when each of
                                     those uses' key is used next)."""

    def __init__(self, trace: Trace) -> None:
        L, J = trace.num_layers, trace.num_experts
        self.L, self.K = L, L * J
        iters = trace.iterations.astype(np.int64)
        self.base = np.concatenate([[0], np.cumsum(iters * L)])               # [R+1]
        self.iterations = iters
        self.S1 = int(self.base[-1]) + 1
        lengths = np.diff(trace.offsets)
        req = np.repeat(np.arange(trace.num_requests), lengths)               # [N] request of each token row
        pos = np.arange(trace.num_tokens) - trace.offsets[req]                # [N] position within the request
        it = np.maximum(pos - trace.prompt_lens[req] + 1, 0)                  # [N] iteration of each row
        step0 = self.base[req] + it * L                                       # [N] step of layer 0
        steps = step0[:, None, None] + np.arange(L)[None, :, None]            # [N, L, 1]
        keys = np.arange(L)[None, :, None] * J + trace.topk.astype(np.int64)  # [N, L, k]
        steps, keys = np.broadcast_arrays(steps, keys)
        codes = np.sort(keys.ravel() * self.S1 + steps.ravel())               # a prefill's tokens share uses:
        self.by_key = codes[np.concatenate([[True], codes[1:] != codes[:-1]])]  # [E] every use once, key-major
        self._by_key_end = np.append(self.by_key, self.K * self.S1)           # + a sentinel no key matches
        key_of, step_of = np.divmod(self.by_key, self.S1)                     # [E]
        after = np.full(self.by_key.size, np.inf)                             # [E] the same key's next use
        same = key_of[1:] == key_of[:-1]
        after[:-1][same] = step_of[1:][same]
        codes = step_of * self.K + key_of                                     # [E] the same uses, step-major codes
        order = np.argsort(codes)
        self.by_step = codes[order]
        self.next_by_step = after[order]                                      # [E] next use after each by_step use
        self.step_ptr = np.searchsorted(self.by_step // self.K, np.arange(self.S1 + 1))
        self.timeline = Timeline(self.by_key, self._by_key_end, self.by_step, self.next_by_step, self.step_ptr,
                                 self.S1, self.K, J)                          # what belady's kernels read
        self.requests: dict[tuple, deque] = defaultdict(deque)
        for r in range(trace.num_requests):
            self.requests[tuple(trace.prompt_ids(r))].append(r)

    def match(self, prompt_ids: list[int]) -> int | None:
        """Trace index of the next unused request with these prompt tokens (reused cyclically)."""
        q = self.requests.get(tuple(prompt_ids))
        if not q:
            return None
        r = q.popleft()
        q.append(r)
        return r
