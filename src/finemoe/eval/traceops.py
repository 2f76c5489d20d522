"""Cut a routing trace into the requests of a split."""
from __future__ import annotations

import numpy as np

from finemoe.traces.format import Trace


def select_requests(trace: Trace, requests: np.ndarray) -> Trace:
    """The requests `requests` (indices, in the given order) of `trace` as a trace of their own."""
    requests = np.asarray(requests, np.int64)
    starts, ends = trace.offsets[requests], trace.offsets[requests + 1]
    rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if requests.size else np.zeros(0, np.int64)
    return Trace(trace.model, trace.num_layers, trace.num_experts, trace.top_k,
                 np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
                 trace.prompt_lens[requests].copy(), trace.iterations[requests].copy(), trace.token_ids[rows],
                 trace.topk[rows], None if trace.probs is None else trace.probs[rows], trace.expert_bytes,
                 trace.probs_note, trace.source, [trace.request_ids[i] for i in requests],
                 [trace.prompt_texts[i] for i in requests])
