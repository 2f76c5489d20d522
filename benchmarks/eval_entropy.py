"""docs/RESULTS.md, section 1 (its table and plot): entropy of request-level vs iteration-level expert usage per layer,
on the reference model, the real FLAME-MoE trace and the built-in random-weight model.

    python3 benchmarks/eval_entropy.py --out docs/results/exp1-entropy.png --json docs/results/exp1-entropy.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.eval.engine_run import record_trace
from finemoe.eval.entropy import usage_entropy
from finemoe.eval.plots import plot_entropy
from finemoe.eval.workload import load_texts, tokenize
from finemoe.traces import load_trace

TEMPLATE = "User: {prompt}\n\nAssistant:"


def engine_trace(model: str | None, args):
    engine = Engine.from_config(EngineConfig(model=model, device="cpu", show_progress=False))
    prompts = tokenize(engine.tokenizer, load_texts([args.prompts], args.limit, 0), TEMPLATE, args.max_prompt_tokens)
    trace = record_trace(engine, prompts, args.max_new_tokens, 8)
    engine.close()
    return trace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="../shared/models/ref-moe")
    p.add_argument("--prompts", default="../shared/data/prompts/lmsys_chat_64.jsonl")
    p.add_argument("--flame", default="../shared/data/traces/flame_moe_290m.npz#seq")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="exp1-entropy.png")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    traces = {"ref-moe (LMSYS prompts)": engine_trace(args.model, args),
              "FLAME-MoE-290M trace": load_trace(args.flame),
              "random-weight built-in model": engine_trace(None, args)}
    results = {f"{name} [{w}]": usage_entropy(t, w) for w in ("topk", "probs") for name, t in traces.items()}
    plot_entropy({k: v for k, v in results.items() if k.endswith("[topk]")}, args.out)
    print(f"{'trace [weights]':44s}{'request bits':>14s}{'iteration bits':>16s}{'max':>7s}{'ratio':>7s}")
    for name, r in results.items():
        req, it = float(np.mean(r["request_bits"])), float(np.mean(r["iteration_bits"]))
        r["mean_request_bits"], r["mean_iteration_bits"] = req, it
        print(f"{name:44s}{req:14.3f}{it:16.3f}{r['max_bits']:7.2f}{it / req:7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
