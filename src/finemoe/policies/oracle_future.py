"""The oracle's view of a recorded trace: every key's uses on one timeline of steps, and one iteration's needs."""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

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
        self.no_keys, self.no_steps = np.zeros(0, np.int64), np.zeros(0)
        self.kernel_view = (self.by_key, self._by_key_end, self.S1)           # oracle_kernels' `future`
        self.requests: dict[tuple, deque] = defaultdict(deque)
        self._trace = trace
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

    def distance_to_next_use(self, keys: np.ndarray, step: int) -> np.ndarray:
        """Steps from `step` until each key is next used (strictly later); inf if never."""
        found = self._by_key_end[self.by_key.searchsorted(keys * self.S1 + step, side="right")]
        key, at = np.divmod(found, self.S1)
        return np.where(key == keys, at - step, np.inf)

    def next_use(self, keys: np.ndarray, step: int) -> np.ndarray:
        """The step at which each key is next used (strictly after `step`); inf if never."""
        return self.distance_to_next_use(keys, step) + step

    def needs(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, steps) used in steps first..last inclusive, in need order."""
        codes = self.by_step[self.step_ptr[first]:self.step_ptr[last + 1]]
        return codes % self.K, codes // self.K


def iteration_needs(future: FutureIndex, b: int, with_previous: bool) -> tuple:
    """What one on-trace row needs in its iteration of steps b .. b+L-1, as oracle_kernels' `needs` tuple: every key
    at most once (a key belongs to one layer), in ascending key order (which is layer order), its layer, and when
    each is needed next; `with_previous`: also the keys of step b-1 and their next uses (else empty)."""
    lo, hi = future.step_ptr[b], future.step_ptr[b + future.L]
    codes = future.by_step[lo:hi]
    steps = codes // future.K
    keys = codes % future.K                                                   # [n] ascending
    layer_of = (steps - b).astype(np.float64)                                 # [n] layer of each key
    bounds = steps.searchsorted(np.arange(b, b + future.L + 1))               # [L+1] first index per layer
    prev_keys, prev_next = future.no_keys, future.no_steps
    if with_previous:
        prev_keys = future.needs(b - 1, b - 1)[0]                             # [m]
        prev_next = future.next_use(prev_keys, b - 1)                         # [m]
    return b, keys, layer_of, future.next_by_step[lo:hi], bounds, prev_keys, prev_next
