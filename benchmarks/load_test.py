"""Bounded loopback load test for `finemoe serve`: requests/s and TTFT / TPOT / latency percentiles
(docs/BENCHMARKS.md, "`finemoe serve` under load").

Each of --concurrency clients sends streaming completions back to back (fixed --max-tokens, ignore_eos)
until --requests have been sent or --max-seconds have passed; requests still running at the deadline
are abandoned and counted as incomplete. Only loopback servers are accepted.

    finemoe serve --device cpu --expert-budget 25% &
    python benchmarks/load_test.py --concurrency 1,4,16 --requests 32 --max-seconds 120 --json
    python benchmarks/load_test.py --spawn "--device cpu --expert-budget 25%" --concurrency 1,4,16

TTFT: request sent -> first token chunk. TPOT: (last chunk - first token chunk) / (tokens - 1), with
the token count from the server's usage. Latency: request sent -> [DONE].
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from contextlib import nullcontext
from urllib.parse import urlparse

import httpx
import numpy as np

from finemoe.server.process import ServerProcess

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ["Explain expert offloading.", "Hello", "List three colours:", "The quick brown fox",
           "Why do MoE models route tokens?", "Summarise: caches hide latency.", "1, 2, 3,", "Translate: bonjour"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a loopback finemoe server")
    p.add_argument("--spawn", metavar="SERVE_ARGS", help="start `finemoe serve SERVE_ARGS` on a free loopback port")
    p.add_argument("--concurrency", default="1", help="clients at once; a comma list runs one pass per value")
    p.add_argument("--requests", type=int, default=32, help="requests per pass")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time limit per pass")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompts", help="JSONL with a 'prompt' field per line (default: 8 built-in prompts)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if min(args.concurrency) < 1 or args.requests < 1 or args.max_seconds <= 0 or args.max_tokens < 2:
        p.error("--concurrency and --requests must be >= 1, --max-seconds > 0, --max-tokens >= 2")
    if not args.spawn and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url {args.url!r} is not a loopback address: this benchmark only targets a local server")
    return args


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return PROMPTS
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_first = t_last = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                now = time.perf_counter()
                t_first = t_first if t_first is not None else now
                t_last = now
    end = time.perf_counter()
    tpot = (t_last - t_first) / (tokens - 1) if tokens > 1 else float("nan")
    return {"ok": True, "ttft_s": t_first - t0, "tpot_s": tpot, "latency_s": end - t0, "tokens": tokens}


async def run_pass(url: str, model: str, prompts: list[str], concurrency: int, n: int, max_s: float,
                   max_tokens: int) -> dict:
    results: list[dict] = []
    issued = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(max_s + 30), limits=limits) as http:
        deadline = time.perf_counter() + max_s

        async def client() -> None:
            nonlocal issued
            while issued < n and time.perf_counter() < deadline:
                prompt = prompts[issued % len(prompts)]
                issued += 1
                results.append(await one_request(http, model, prompt, max_tokens))

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=max_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    return summarize(results, issued, wall, concurrency)


def pct(values: list[float]) -> dict:
    v = np.array([x for x in values if x == x])
    if v.size == 0:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(v, q)) for q in (50, 90, 99)}


def summarize(results: list[dict], issued: int, wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    return {"concurrency": concurrency, "issued": issued, "completed": len(ok),
            "errors": [r["error"] for r in results if not r["ok"]][:5], "incomplete": issued - len(results),
            "wall_s": wall, "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_s": pct([r["ttft_s"] for r in ok]), "tpot_s": pct([r["tpot_s"] for r in ok]),
            "latency_s": pct([r["latency_s"] for r in ok])}


async def main_async(args: argparse.Namespace, url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        health = (await http.get("/health")).json()
        prompts = read_prompts(args.prompts)
        for i in range(args.warmup):
            await one_request(http, model, prompts[i % len(prompts)], args.max_tokens)
    runs = [await run_pass(url, model, prompts, c, args.requests, args.max_seconds, args.max_tokens)
            for c in args.concurrency]
    server = {k: health.get(k) for k in ("model", "model_label", "policy", "device", "expert_budget_bytes",
                                         "cache_slots", "max_batch_size")}
    return {"server": server, "max_tokens": args.max_tokens, "runs": runs}


def fmt(p: dict, scale: float = 1e3) -> str:
    return "/".join("-" if p[k] is None else f"{p[k] * scale:.1f}" for k in ("p50", "p90", "p99"))


def main(argv=None) -> int:
    args = parse_args(argv)
    spawn = ServerProcess(shlex.split(args.spawn)) if args.spawn else nullcontext()
    with spawn as server:
        report = asyncio.run(main_async(args, server.url if args.spawn else args.url))
    if args.json:
        print(json.dumps(report))
        return 0
    s = report["server"]
    print(f"model {s['model']}  policy {s['policy']}  device {s['device']}  cache slots {s['cache_slots']}  "
          f"max batch {s['max_batch_size']}  max_tokens {report['max_tokens']}")
    print("conc  done/issued  req/s   tok/s   TTFT ms p50/p90/p99     TPOT ms p50/p90/p99    latency ms p50/p90/p99")
    for r in report["runs"]:
        print(f"{r['concurrency']:>4}  {r['completed']:>4}/{r['issued']:<6} {r['requests_per_s']:6.2f} "
              f"{r['output_tokens_per_s']:7.1f}   {fmt(r['ttft_s']):<22} {fmt(r['tpot_s']):<22} {fmt(r['latency_s'])}")
        for e in r["errors"]:
            print(f"      error: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
