"""Bench outputs: per-request CSV, summary JSON, and the compact table printed at the end."""
from __future__ import annotations

import csv
import json
import math
import os

from finemoe.eval.runner import REQUEST_KEYS, SUMMARY_KEYS


def write_csv(path: str, rows: list[dict], keys: tuple[str, ...] = REQUEST_KEYS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _clean(x):
    return None if isinstance(x, float) and (math.isnan(x) or math.isinf(x)) else x


def write_outputs(out_dir: str, summary: list[dict], per_request: list[dict], meta: dict) -> dict[str, str]:
    """requests.csv, summary.json ({"meta", "results"}) and summary.csv in `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"requests": os.path.join(out_dir, "requests.csv"), "summary": os.path.join(out_dir, "summary.json"),
             "summary_csv": os.path.join(out_dir, "summary.csv")}
    write_csv(paths["requests"], per_request)
    write_csv(paths["summary_csv"], summary, SUMMARY_KEYS)
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": [{k: _clean(v) for k, v in r.items()} for r in summary]}, f, indent=1)
    return paths


def json_results(summary: list[dict]) -> dict:
    return {"results": [{k: _clean(v) for k, v in r.items()} for r in summary]}


def setup_line(meta: dict, budgets: list[str]) -> str:
    """What a bench measured, for its table header and plot titles: mode, device, budget, bandwidth, sample size."""
    if meta["mode"] == "simulate":
        how = (f"simulated from traces recorded on {meta['device']} ({meta['bandwidth_GBps']} GB/s copies, layer "
               f"{meta['layer_time_ms']} ms)")
    else:
        how = f"engine on {meta['device']} (measured copies)"
    return (f"{how}; budget {', '.join(map(str, budgets))}; {meta['held_out_prompts']} held-out prompts x "
            f"{meta['max_new_tokens']} new tokens")


def _ms(x) -> str:
    return "-" if x is None or x != x else f"{x * 1e3:.2f}"


def table(summary: list[dict]) -> str:
    """One line per row: label, mode, budget, d, hit rate, misses, MB/token, TTFT/TPOT ms."""
    width = max([len("policy")] + [len(r["policy"]) for r in summary]) + 2
    lines = [f"{'policy':<{width}}{'mode':<10}{'budget':>8}{'d':>4}{'hit rate':>10}{'misses':>9}"
             f"{'MB/token':>10}{'TTFT ms':>10}{'TPOT ms':>10}"]
    for r in summary:
        d = "-" if r["prefetch_distance"] is None else str(r["prefetch_distance"])
        lines.append(f"{r['policy']:<{width}}{r['mode']:<10}{r['expert_budget']:>8}{d:>4}{r['hit_rate']:>10.4f}"
                     f"{r['misses']:>9}{r['bytes_per_token'] / 1e6:>10.2f}{_ms(r['ttft_s']):>10}{_ms(r['tpot_s']):>10}")
    return "\n".join(lines)
