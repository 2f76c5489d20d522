"""Serving prompts through an already-loaded Engine in fixed-size batches."""
from __future__ import annotations

import hashlib
import json
import os
import time

from finemoe.engine import Engine, SamplingParams
from finemoe.engine.batch import BatchRunner
from finemoe.engine.request import Request
from finemoe.eval.workload import Prompt
from finemoe.traces import load_trace


def make_requests(prompts: list[Prompt], max_new_tokens: int) -> list[Request]:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return [Request(list(p.ids), params, p.text) for p in prompts]


def run_requests(engine: Engine, requests: list[Request], batch: int) -> list[Request]:
    """Run in submission order, `batch` requests at a time; each request's clock starts when its batch does
    (so TTFT excludes time spent waiting behind earlier batches)."""
    for start in range(0, len(requests), batch):
        group = requests[start:start + batch]
        now = time.perf_counter()
        for r in group:
            r.metrics.t_submit = now
        runner = BatchRunner(engine, group)
        while not runner.done:
            runner.step()
    return requests


def record_trace(engine: Engine, prompts: list[Prompt], max_new_tokens: int, batch: int):
    """Routing of `prompts` (one trace request per prompt, in order) with the `record` policy."""
    engine.reconfigure("record", None, {"inner": "lru", "probs": True})
    run_requests(engine, make_requests(prompts, max_new_tokens), batch)
    trace = engine.policy.to_trace(engine.model_name, engine.geometry.expert_bytes)
    trace.prompt_texts = [p.text for p in prompts]
    engine.reconfigure("lru", None, {})
    return trace


def cached_trace(folder: str | None, engine: Engine, prompts: list[Prompt], max_new_tokens: int, batch: int):
    """record_trace, kept in `folder` under a name derived from the model, the prompt token ids and
    max_new_tokens, so later benches over the same prompts reuse it (None: no caching)."""
    if folder is None:
        return record_trace(engine, prompts, max_new_tokens, batch)
    key = hashlib.sha256(json.dumps([engine.model_name, max_new_tokens, [p.ids for p in prompts]]).encode())
    path = os.path.join(folder, f"trace-{key.hexdigest()[:16]}.safetensors")
    if os.path.exists(path):
        return load_trace(path)
    trace = record_trace(engine, prompts, max_new_tokens, batch)
    os.makedirs(folder, exist_ok=True)
    trace.save(path)
    return trace
