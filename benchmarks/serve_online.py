"""Online serving with real arrival times: next-batch admission against continuous batching at the same load
(issue 22's GPU targets: TTFT p99, throughput and TPOT p50 against batch 1).

Requests arrive as in an Azure LLM-inference workload (../shared/data/workloads/, arrival_s and output_tokens),
carry real prompts (../shared/data/prompts/, cycled, cut to --max-prompt-tokens) and generate the workload's
output length (capped by --max-tokens, EOS ignored). For every policy the server's capacity is measured first
(every request queued at once, continuous batching: completed requests / wall time); the arrival trace is then
scaled so requests arrive at --load of that capacity, and replayed against each --scheduling. Per run: TTFT,
TPOT and queue time p50/p90/p99, throughput (requests/s, output tokens/s), the expert hit rate; and per policy
the batch-1 TPOT (requests served one at a time) that continuous batching's TPOT is compared with.

Two drivers, the same scheduler code (server/scheduler.py): --driver http starts `finemoe serve` for each run
and streams through its OpenAI API on loopback (queue time: mean from /metrics); --driver inprocess runs the
scheduler thread in this process with asyncio clients (no fastapi/uvicorn needed). auto: http when the serve
extra is installed.

    python3 benchmarks/serve_online.py --model random:qwen1.5-moe-a2.7b --expert-budget 25% \\
        --policies lru,finemoe --requests 200 --load 0.7 --out /tmp/online.json --plots /tmp/online
    python3 benchmarks/serve_online.py --device cpu --tiny --requests 8 --out /tmp/o.json   # CPU smoke test
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.eval.online import scale_to_load
from finemoe.server.scheduler import Job, Scheduler, SchedulerMetrics

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_common import Progress  # noqa: E402
from load_test import one_request, pct  # noqa: E402  (the closed-loop load test's streaming client)

SCHEDULINGS = ("next-batch", "continuous")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="as `finemoe serve --model` (default: the built-in tiny model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--expert-budget", default="25%", help="as `finemoe serve --expert-budget`")
    p.add_argument("--policies", default="lru,finemoe", help="comma list of policies, each measured")
    p.add_argument("--scheduling", default=",".join(SCHEDULINGS), help="comma list of next-batch, continuous")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="continuous batching's tokens per engine step")
    p.add_argument("--arrivals", default="../shared/data/workloads/azure_conv.csv",
                   help="workload CSV with arrival_s and output_tokens columns")
    p.add_argument("--prompts", default="../shared/data/prompts/lmsys_chat_64.jsonl",
                   help="JSONL prompts, cycled over the requests")
    p.add_argument("--requests", type=int, default=100, help="requests replayed per run")
    p.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of the measured capacity")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts cut to this many tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="cap on the workload's output_tokens")
    p.add_argument("--batch1-requests", type=int, default=4, help="requests served alone for the batch-1 TPOT")
    p.add_argument("--driver", choices=["auto", "http", "inprocess"], default="auto",
                   help="http: a `finemoe serve` per run; inprocess: the scheduler in this process; auto: http "
                        "when the serve extra is installed")
    p.add_argument("--serve-args", default="", help="extra `finemoe serve` arguments (http driver)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: the built-in tiny model, short outputs")
    p.add_argument("--out", default=None, help="full JSON report")
    p.add_argument("--plots", default=None, metavar="DIR", help="TTFT and TPOT CDF plots (PNG)")
    args = p.parse_args(argv)
    args.policies = args.policies.split(",")
    args.scheduling = args.scheduling.split(",")
    if set(args.scheduling) - set(SCHEDULINGS):
        p.error(f"--scheduling: use {', '.join(SCHEDULINGS)}")
    if args.requests < 2 or not 0 < args.load:
        p.error("--requests must be >= 2 and --load > 0")
    if args.driver == "auto":
        serve = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "prometheus_client"))
        args.driver = "http" if serve else "inprocess"
    return args


def workload(args, tokenizer) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """(arrival_s [R] from 0, prompt token ids per request, output tokens per request)."""
    try:
        with open(args.arrivals, newline="", encoding="utf-8") as f:
            rows = [r for _, r in zip(range(args.requests), csv.DictReader(f))]
        with open(args.prompts, encoding="utf-8") as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read the workload ({args.arrivals}, {args.prompts}): {e}") from None
    if len(rows) < args.requests:
        raise ConfigError(f"{args.arrivals} has {len(rows)} requests, fewer than --requests {args.requests}")
    arrivals = np.array([float(r["arrival_s"]) for r in rows])
    prompts = [tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"][:args.max_prompt_tokens]
               for i in range(args.requests)]
    outputs = [max(2, min(int(r["output_tokens"]), args.max_tokens)) for r in rows]
    return arrivals - arrivals[0], prompts, outputs


# ---- the in-process driver: the server's scheduler thread, asyncio clients ----------------------------------
class KeepEngine:
    """Persistence for a benchmark's scheduler: nothing to save, and the engine outlives the scheduler."""

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


async def inprocess_run(engine: Engine, scheduling: str, arrivals: np.ndarray, prompts, outputs) -> dict:
    sched = Scheduler(engine, SchedulerMetrics(), KeepEngine(), engine.cfg.max_batch_size, 0.0, scheduling)
    sched.start()
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()

    async def client(i: int) -> dict:
        await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        req = engine.make_request(prompts[i], SamplingParams(max_new_tokens=outputs[i], ignore_eos=True))
        job = Job(req, loop)
        sched.submit(job)
        while (await job.events.get()).finish_reason is None:
            pass
        m = req.metrics
        return {"ok": req.finish_reason == "length", "ttft_s": m.ttft_s, "tpot_s": m.tpot_s,
                "latency_s": m.t_last - m.t_submit, "tokens": m.tokens, "queue_s": m.t_admit - m.t_submit,
                "hits": m.hits, "misses": m.misses}

    hits0 = engine.runtime.totals.hits.sum() + 0
    misses0 = engine.runtime.totals.misses.sum() + 0
    results = await asyncio.gather(*(client(i) for i in range(len(prompts))))
    wall = time.perf_counter() - t0
    await asyncio.to_thread(sched.stop)
    hits, misses = engine.runtime.totals.hits.sum() - hits0, engine.runtime.totals.misses.sum() - misses0
    return summary(results, wall, int(hits), int(misses))


# ---- the http driver: `finemoe serve` per run -------------------------------------------------------------
def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    names = ("finemoe_expert_hits_total", "finemoe_expert_misses_total", "finemoe_queue_wait_seconds_sum",
             "finemoe_queue_wait_seconds_count")
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in names:
            out[key] = float(value)
    return out


async def http_run(url: str, model: str, arrivals: np.ndarray, prompts, outputs) -> dict:
    before = counters(url)
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600), limits=limits) as http:
        t0 = time.perf_counter()

        async def client(i: int) -> dict:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            return await one_request(http, model, prompts[i], outputs[i])

        results = await asyncio.gather(*(client(i) for i in range(len(prompts))))
        wall = time.perf_counter() - t0
    after = counters(url)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    s = summary(results, wall, int(d["finemoe_expert_hits_total"]), int(d["finemoe_expert_misses_total"]))
    s["queue_mean_s"] = d["finemoe_queue_wait_seconds_sum"] / max(d["finemoe_queue_wait_seconds_count"], 1)
    return s


def summary(results: list[dict], wall: float, hits: int, misses: int) -> dict:
    ok = [r for r in results if r["ok"]]
    out = {"requests": len(results), "completed": len(ok), "wall_s": wall, "requests_per_s": len(ok) / wall,
           "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
           "hit_rate": hits / (hits + misses) if hits + misses else None,
           "errors": [r["error"] for r in results if not r["ok"]][:5]}
    for key in ("ttft_s", "tpot_s", "latency_s", "queue_s"):
        if all(key in r for r in ok):
            out[key] = pct([r[key] for r in ok])
    out["samples"] = {key: [r[key] for r in ok] for key in ("ttft_s", "tpot_s")}
    return out


# ---- the runs ---------------------------------------------------------------------------------------------
def engine_config(args, policy: str, batch: int | None = None) -> EngineConfig:
    kw = {"device": args.device} if args.device else {}
    return EngineConfig(model=args.model, expert_budget=args.expert_budget, policy=policy,
                        max_batch_size=batch or args.max_batch_size,
                        max_num_batched_tokens=max(args.max_num_batched_tokens, batch or args.max_batch_size),
                        show_progress=False, **kw)


def serve_args(args, policy: str, scheduling: str) -> list[str]:
    a = ["--expert-budget", str(args.expert_budget), "--policy", policy, "--max-batch-size",
         str(args.max_batch_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
         "--scheduling", scheduling, "--max-queue", "0", "--log-level", "warning", *shlex.split(args.serve_args)]
    a += ["--model", args.model] if args.model else []
    return a + (["--device", args.device] if args.device else [])


def run_policy(args, policy: str, engine: Engine) -> dict:
    """Capacity, batch-1 TPOT and (in-process driver) one replay per scheduling for `policy` on `engine`, which is
    configured with it."""
    say = Progress(policy)
    arrivals, prompts, outputs = workload(args, engine.tokenizer)
    alone = [engine.make_request(p, SamplingParams(max_new_tokens=o, ignore_eos=True))
             for p, o in zip(prompts[:args.batch1_requests], outputs)]
    engine.run([engine.make_request(prompts[0], SamplingParams(max_new_tokens=4))])   # warm-up, unmeasured
    for r in alone:                        # one request at a time: a batch of one
        engine.run([r])
    tpot1 = float(np.median([r.metrics.tpot_s for r in alone if r.metrics.tokens > 1]))
    say(f"batch-1 TPOT {tpot1 * 1e3:.1f} ms")
    burst = np.zeros(len(prompts))
    engine.reconfigure(policy, args.expert_budget)
    cap = asyncio.run(inprocess_run(engine, "continuous", burst, prompts, outputs))
    capacity = cap["requests_per_s"]
    say(f"capacity {capacity:.2f} requests/s")
    scaled = scale_to_load(arrivals, 1.0 / capacity, args.load)
    runs = {}
    for scheduling in args.scheduling:
        engine.reconfigure(policy, args.expert_budget)      # every run starts from an empty cache and policy
        if args.driver == "inprocess":
            runs[scheduling] = asyncio.run(inprocess_run(engine, scheduling, scaled, prompts, outputs))
            say(f"{scheduling}: {runs[scheduling]['requests_per_s']:.2f} requests/s")
    return {"policy": policy, "capacity_requests_per_s": capacity, "batch1_tpot_s": tpot1,
            "capacity_run": {k: v for k, v in cap.items() if k != "samples"}, "runs": runs,
            "arrivals_s": scaled.tolist(), "prompts": prompts, "outputs": outputs}


def free_device_memory() -> None:
    """Collect a dropped engine (its runtime, cache and policy reference each other) and give its cached device
    memory back: the http driver's server process needs it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def http_runs(args, result: dict) -> None:
    from finemoe.server.process import ServerProcess
    for scheduling in args.scheduling:
        with ServerProcess(serve_args(args, result["policy"], scheduling)) as server:
            model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
            httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": result["prompts"][0],
                                                             "max_tokens": 2}, timeout=600)   # warm-up
            arrivals = np.array(result["arrivals_s"])
            result["runs"][scheduling] = asyncio.run(http_run(server.url, model, arrivals, result["prompts"],
                                                              result["outputs"]))


def plot(report: dict, out_dir: str) -> list[str]:
    from finemoe.eval.plots import plot_cdf
    paths = []
    for key, label in (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)")):
        curves = {f"{p['policy']} {s}": r["samples"][key] for p in report["policies"] for s, r in p["runs"].items()}
        paths.append(plot_cdf(curves, str(Path(out_dir) / f"online_{key[:-2]}_cdf.png"),
                              f"{key[:4].upper()} at {report['load']:.0%} of capacity", label))
    return paths


def fmt(p: dict | None, scale: float = 1e3) -> str:
    return "-" if p is None else "/".join(f"{p[k] * scale:.0f}" if p[k] is not None else "-"
                                          for k in ("p50", "p90", "p99"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        args.max_tokens, args.max_prompt_tokens = min(args.max_tokens, 8), min(args.max_prompt_tokens, 32)
    report = {"driver": args.driver, "load": args.load, "model": args.model or "built-in tiny",
              "expert_budget": args.expert_budget, "max_batch_size": args.max_batch_size,
              "max_num_batched_tokens": args.max_num_batched_tokens, "arrivals": args.arrivals,
              "prompts": args.prompts, "policies": []}
    say = Progress("serve_online")
    engine = None                  # one model for every policy (in-process); the http driver frees it per policy
    for policy in args.policies:
        if engine is None:
            engine = Engine.from_config(engine_config(args, policy))
            say("engine started")
        else:
            engine.reconfigure(policy, args.expert_budget)
        result = run_policy(args, policy, engine)
        if args.driver == "http":
            engine.close()
            engine = None
            free_device_memory()
            http_runs(args, result)
        for key in ("prompts", "outputs"):
            result.pop(key)
        report["policies"].append(result)
    if engine is not None:
        engine.close()
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        report["plots"] = plot(report, args.plots)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"driver {args.driver}  model {report['model']}  budget {args.expert_budget}  load {args.load:.0%} of "
          f"capacity  max batch {args.max_batch_size}  tokens/step {args.max_num_batched_tokens}")
    print("policy         scheduling  cap req/s  req/s  tok/s  hit   TTFT ms p50/p90/p99   TPOT ms p50/p90/p99  "
          "queue ms p50/p90/p99  TPOT1 ms")
    for p in report["policies"]:
        for s, r in p["runs"].items():
            queue = fmt(r.get("queue_s")) if "queue_s" in r else f"mean {r.get('queue_mean_s', 0) * 1e3:.0f}"
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
            print(f"{p['policy']:<14} {s:<11} {p['capacity_requests_per_s']:9.2f} {r['requests_per_s']:6.2f} "
                  f"{r['output_tokens_per_s']:6.1f} {hit:>4}  {fmt(r.get('ttft_s')):<20} {fmt(r.get('tpot_s')):<20} "
                  f"{queue:<21} {p['batch1_tpot_s'] * 1e3:.1f}")
    return report


if __name__ == "__main__":
    main()
