"""Print a `finemoe bench` summary.json as the markdown table used in docs/RESULTS.md; with --inf, add the
hit rate of the same policies from a free-copies run (--bandwidth inf).

    python3 benchmarks/eval_tables.py docs/results/exp2-arena/summary.json \\
        --inf docs/results/exp2-arena-inf/summary.json
"""
from __future__ import annotations

import argparse
import json
import sys


def fmt(x, scale=1.0, digits=3):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summary")
    p.add_argument("--inf", default=None, help="summary.json of the same bench with --bandwidth inf")
    args = p.parse_args(argv)
    data = json.load(open(args.summary))
    inf = {}
    if args.inf:
        inf = {(r["policy"], r["expert_budget"], r["prefetch_distance"]): r["hit_rate"]
               for r in json.load(open(args.inf))["results"]}
    print(f"<!-- {args.summary}: {json.dumps(data['meta'])} -->")
    extra = " hit rate (inf) |" if inf else ""
    print(f"| policy | mode | budget | d | hit rate |{extra} misses | experts copied / token | TTFT ms | TPOT ms "
          "| wasted prefetches | store entries | policy ms / iteration |")
    print("|---" * (12 + bool(inf)) + "|")
    for r in data["results"]:
        sim = r["mode"] == "simulate"
        per_tok = r["experts_copied"] / r["output_tokens"]
        key = (r["policy"], r["expert_budget"], r["prefetch_distance"])
        col = f" {fmt(inf.get(key, r['hit_rate'] if not sim else None))} |" if inf else ""
        print(f"| {r['policy']} | {r['mode']} | {r['expert_budget']} | {r['prefetch_distance'] or '-'} "
              f"| {fmt(r['hit_rate'])} |{col} {r['misses']} | {per_tok:.1f} "
              f"| {fmt(r['ttft_s'], 1e3, 1) if sim else '(CPU)'} | {fmt(r['tpot_s'], 1e3, 1) if sim else '(CPU)'} "
              f"| {r['wasted_prefetches']} | {r['store_entries'] or '-'} | {fmt(r['policy_ms_per_iteration'], 1, 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
