"""How much of the decode gap to the clairvoyant bound is eviction, and can history predict the next use?
(docs/RESULTS.md, the table of the last section.)

Decode at a 25% budget is copy-bound: TPOT follows the bytes copied per token, and with no prefetching
those bytes are set by eviction alone. This replays a recorded trace's held-out requests (same seeded 70/30
split as bench_policies_gpu.py) through the simulator and reports, for decode iterations only, hit rate,
MB copied per token and simulated ms per token for:
  lru, lfu                      the baselines (no prefetch)
  oracle/prefetch=false         Belady eviction (evict the expert used farthest in the future), no prefetch:
                                the fewest copies any eviction rule can reach without prefetching
  oracle                        Belady plus exact prefetches (the bound)
  recency-frequency a=...       evict the lowest decayed use count (LRFU: per layer step, counts *= a, +1-a
                                for the experts used), i.e. history of which experts were routed
  router-ema a=...              evict the lowest decayed router probability (soft: every expert's softmax,
                                not just the top-k), i.e. history of how likely each expert was
  cyclic-next-use a=...         evict the largest expected time to next use: layers until the expert's layer
                                runs again plus L * (1 - q) / q iterations, q its decayed use count
The three history rules are defined here (experiments, not registered policies). They run through the same
Replay, ExpertCache and cost model as every registered policy. With --embed-from (the recorded model's folder,
for finemoe's token embeddings), finemoe variants are added, their map store learned from the build split.

    python3 benchmarks/eviction_predictability.py --trace .carry/refmoe_lmsys64.safetensors \
        --embed-from ../shared/models/ref-moe --out /tmp/evict.json
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from bench_policies_gpu import subset
from finemoe.cli.replay_args import input_embedding
from finemoe.eval.split import shuffled_split
from finemoe.eval.history import HistoryBuilder, replay_builder
from finemoe.eval.variants import parse_variants
from finemoe.policies.base import EvictionRank, Policy, Prefetch, register_policy
from finemoe.simulator.replay import Replay
from finemoe.simulator.transport import CostModel
from finemoe.traces import load_trace


class _History(Policy):
    """No prefetch; victims have the lowest `score` (ties: least recently used, then slot), kept as a live rank."""

    needs_router_probs = True

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay

    def bind(self, ctx) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.J, self.L = g.num_experts, g.num_layers
        self.count = np.zeros(g.total_experts)        # [L*J] decayed use count (one step per layer's use)
        self.soft = np.zeros(g.total_experts)         # [L*J] decayed router probability
        self.last = np.zeros(g.total_experts)         # [L*J] clock of the last use
        self.clock, self.now = 0, 0
        self.keys = np.arange(g.total_experts)
        self.rank = EvictionRank.of(np.zeros(g.total_experts), self.last)   # primary: `score`, kept current

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.clock += 1
        self.now = layer
        seg = self.count[layer * self.J:(layer + 1) * self.J]
        seg *= self.decay
        seg[experts] += 1 - self.decay
        self.last[layer * self.J + experts] = self.clock
        self.rank.primary[:] = self.score(self.keys)

    def on_layer_routed(self, routing) -> Prefetch:
        seg = self.soft[routing.layer * self.J:(routing.layer + 1) * self.J]
        seg *= self.decay
        seg += (1 - self.decay) * np.asarray(routing.probs).max(0)     # host: torch (engine) or numpy (simulator)
        self.rank.primary[:] = self.score(self.keys)
        return Prefetch.empty()

    def score(self, c: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def eviction_rank(self) -> EvictionRank:
        return self.rank


@register_policy
class RecencyFrequency(_History):
    name = "recency-frequency"
    description = "experiment: evict the lowest decayed use count (LRFU)"

    def score(self, c):
        return self.count[c]


@register_policy
class RouterEMA(_History):
    name = "router-ema"
    description = "experiment: evict the lowest decayed router probability"

    def score(self, c):
        return self.soft[c]


@register_policy
class CyclicNextUse(_History):
    name = "cyclic-next-use"
    description = "experiment: evict the largest expected time to next use (layer distance + geometric reuse)"

    def score(self, c):
        layers_ahead = (c // self.J - self.now - 1) % self.L + 1
        q = np.clip(self.count[c], 1e-3, 1.0)
        return -(layers_ahead + self.L * (1 - q) / q)


class DecodeReplay(Replay):
    """A Replay that also totals decode iterations alone (a prefill copies almost every expert)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode = {"s": 0.0, "bytes": 0, "tokens": 0, "hits": 0, "misses": 0}

    def _iteration(self, r: int, i: int) -> tuple[int, int, int]:
        t0, b0 = self.transport.now, self.transport.bytes_copied
        hits, misses, cpu = super()._iteration(r, i)
        if i > 0:
            acc = self.decode
            acc["s"] += self.transport.now - t0
            acc["bytes"] += self.transport.bytes_copied - b0
            acc["tokens"] += 1
            acc["hits"] += hits
            acc["misses"] += misses
        return hits, misses, cpu


def decode_row(trace, label: str, policy: str, options: dict, cost: CostModel, budget: str) -> dict:
    """Replay `trace`; hit rate, bytes and time of decode iterations only."""
    rep = DecodeReplay(trace, policy, budget, cost, options)
    row = rep.run()
    acc = rep.decode
    n = max(acc["tokens"], 1)
    return {"policy": label, "decode_hit_rate": acc["hits"] / max(acc["hits"] + acc["misses"], 1),
            "decode_mb_per_token": acc["bytes"] / n / 1e6, "decode_ms_per_token": acc["s"] / n * 1e3,
            "tpot_ms": row["tpot_s"] * 1e3, "hit_rate": row["hit_rate"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--decays", default="0.5,0.9,0.95")
    ap.add_argument("--expert-bytes", type=int, default=17301504)
    ap.add_argument("--bandwidth", type=float, default=53.3, help="GB/s (H100 pinned, as measured)")
    ap.add_argument("--layer-time-ms", type=float, default=0.335)
    ap.add_argument("--host-layer-ms", type=float, default=0.111)
    ap.add_argument("--embed-from", default=None, help="recorded model's folder: adds the --finemoe variants")
    ap.add_argument("--finemoe", default="finemoe,finemoe/eviction=ema+p,finemoe/max_prefetch=1,"
                                         "finemoe/max_prefetch=1/eviction=ema+p")
    ap.add_argument("--build-limit", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    build, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build, held = subset(trace, build[:args.build_limit].tolist()), subset(trace, held[:args.eval_limit].tolist())
    cost = CostModel(args.expert_bytes, args.bandwidth * 1e9, args.layer_time_ms / 1e3, args.host_layer_ms / 1e3)
    runs = [("lru", "lru", {}), ("lfu", "lfu", {}), ("oracle/prefetch=false", "oracle", {"prefetch": False}),
            ("oracle", "oracle", {})]
    for a in [float(x) for x in args.decays.split(",")]:
        for name in ("recency-frequency", "router-ema", "cyclic-next-use"):
            runs.append((f"{name} a={a}", name, {"decay": a}))
    rows = []
    if args.embed_from:
        embed = input_embedding(args.embed_from)
        builder = HistoryBuilder(tempfile.mkdtemp(prefix="evict-"), replay_builder(build, embed))
        for v in parse_variants(args.finemoe):
            runs.append((v.label, v.policy, {**builder.options_for(v, None), "embed": embed}))
    for label, policy, options in runs:
        rows.append(decode_row(held, label, policy, options, cost, args.budget))
        r = rows[-1]
        print(f"{label:28s} decode hit {r['decode_hit_rate']:.3f}  {r['decode_mb_per_token']:6.0f} MB/token  "
              f"{r['decode_ms_per_token']:6.2f} ms/token  (TPOT {r['tpot_ms']:.2f} ms)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"trace": args.trace, "model": trace.model, "budget": args.budget,
                       "eval_requests": held.num_requests, "cost": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
