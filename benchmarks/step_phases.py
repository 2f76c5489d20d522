"""Time the phases of finemoe decode steps (begin, model forward, sample+sync, end) against a plain
forward of the same model, interleaved. Diagnostic for the resident-TPOT gap.

    PYTHONPATH=src:benchmarks python3 benchmarks/step_phases.py
"""
from __future__ import annotations

import statistics
import time

import torch

from bench_engine import PlainToggle, plain_loop
from benchmarks_common import build_model
from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.batch import BatchRunner
from finemoe.models.default import default_tokenizer
from finemoe.models.loader import LoadedModel


def timed_engine_steps(engine: Engine, ids: list[int], n: int) -> dict:
    req = engine.make_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))
    batch = BatchRunner(engine, [req])
    phases = {"begin": [], "forward": [], "sample_sync": [], "end": [], "step": []}
    rt = engine.runtime
    orig_begin, orig_end = rt.begin_iteration, rt.end_iteration

    def begin(*a):
        t = time.perf_counter(); orig_begin(*a); phases["begin"].append(time.perf_counter() - t)

    def end():
        t = time.perf_counter(); r = orig_end(); phases["end"].append(time.perf_counter() - t); return r

    rt.begin_iteration, rt.end_iteration = begin, end
    while not batch.done:
        t = time.perf_counter()
        batch.step()
        phases["step"].append(time.perf_counter() - t)
    rt.begin_iteration, rt.end_iteration = orig_begin, orig_end
    return {k: statistics.median(v[1:]) * 1e3 for k, v in phases.items() if len(v) > 1}


@torch.inference_mode()
def forward_only(model, ids, n) -> float:
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        cache = out.past_key_values
    return statistics.median(ts[1:]) * 1e3


def main() -> None:
    model = build_model(24, 0, "cuda", False)
    ids = torch.randint(2, 1000, (1, 64), device="cuda")
    plain_loop(model, ids, 4)
    toggle = PlainToggle(model, None)
    engine = Engine(LoadedModel(model, default_tokenizer(), "s", "s"),
                    EngineConfig(device="cuda", policy="resident", show_progress=False))
    for rnd in range(3):
        toggle.plain()
        p = forward_only(model, ids, 24)
        toggle.finemoe()
        f = forward_only(model, ids, 24)
        ph = timed_engine_steps(engine, ids[0].tolist(), 24)
        print(f"round {rnd}: plain fwd {p:.2f} ms | finemoe fwd {f:.2f} ms | engine step phases (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))


if __name__ == "__main__":
    main()
