"""Side by side with what users would run instead (issue 26), on one machine and one model shape: llama.cpp with the
routed experts on the CPU, accelerate's `device_map` offload, and finemoe at a 25% expert budget.

Model: Qwen1.5-MoE-A2.7B's shapes with the routing trace's number of layers (12 for the reference model's trace),
seeded random weights (seed 0, as benchmarks_common.build_model gives every GPU benchmark), bf16. At 12 layers the
Hugging Face checkpoint and the GGUF file are about 15 GB each (30 GB of the box's 64 GB disk); the full 24 layers
would need 57 GB and do not fit. Prompts: the trace's held-out requests (shuffled split, seed 0), batch 1.

Stages (`--stages`, comma-separated, in this order):
  build       copy the trimmed llama.cpp tree (benchmarks/peers/prepare_llamacpp.py) to --work once and build
              llama-bench (CUDA for sm_90 + CPU backend; CPU only with --device cpu) with ninja in the background
              while the next stages run; waits for it at most until --deadline-s after the start, then stops it
              (a later call on the warm machine resumes it).
  convert     save the checkpoint (save_pretrained, bf16, byte-level tokenizer: peers/checkpoint.py) and convert it
              to GGUF bf16 with the vendored converter (peers/gguf_convert.py).
  llamacpp    llama-bench: `-ngl 99` (all on the GPU), `-ncmoe 9` (experts of 9 of 12 layers on the CPU: the same 25%
              of expert bytes on the GPU as finemoe's budget) and `-ncmoe 12` (all experts on the CPU); prefill
              tokens/s (pp, P = median held-out prompt length) and decode time per token (tg of the trace's decode
              length after a P-token context). This llama.cpp has no expert cache option (its offload options are
              -ncmoe / -ot and, for batches of 32+ tokens, copying CPU-resident weights to the GPU, "op offload", on
              by default).
  accelerate  from_pretrained with a device_map: non-expert weights and the experts of the first 25% of layers on
              the GPU, the other experts on "cpu" (peers/accelerate_offload.py); TTFT and TPOT on the first
              --accelerate-requests held-out prompts.
  finemoe     the engine on the same model with the trace's routing replayed (engine/replay.py): resident, then lru
              and finemoe at --budget in each --modes (gpu: exact; auto: experts split between copies and the CPU).
              finemoe's map store is learned from the build part first.
Every stage writes --work/results/STAGE.json and a copy --out/peers_STAGE.json; the table printed last (and
--out/peers.json) combines every stage run so far in --work, so the stages may run in separate calls on a warm
machine. The ratio column is TPOT / llama.cpp's all-experts-on-CPU TPOT (its best thread count): below 1 is faster.
llama.cpp's and accelerate's cost does not depend on which experts are routed (they compute every routed expert
where it lives); finemoe's does (cache hits), which is why its routing is the trained reference model's.

On the H100 box (/tmp lives while the machine stays warm; run from the repository root, carry .carry):
    call 1 (~8-10 min: build ~6-9 min on 16 cores overlapping the checkpoint and conversion ~3-5 min):
        PYTHONPATH=src:benchmarks python3 benchmarks/peers_gpu.py --trace .carry/refmoe_lmsys64.safetensors \\
            --stages build,convert --out $OUT
    call 2 (~6-8 min; if call 1 printed "build: not finished", it finishes first):
        PYTHONPATH=src:benchmarks python3 benchmarks/peers_gpu.py --trace .carry/refmoe_lmsys64.safetensors \\
            --stages build,llamacpp,accelerate,finemoe --out $OUT
CPU smoke run (tiny widths, CPU-only build, minutes): --device cpu --tiny --work /tmp/peers-tiny.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks_common import serve_replayed, build_model, replayed_model
from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.engine.replay import RoutingReplay
from finemoe.eval.split import shuffled_split
from finemoe.traces.format import load_trace
from peers import accelerate_offload, llamacpp
from peers.checkpoint import save_checkpoint

STAGES = ("build", "convert", "llamacpp", "accelerate", "finemoe")
ROOT = Path(__file__).resolve().parents[1]
CONVERTER = Path(__file__).resolve().parent / "peers" / "gguf_convert.py"


def record(args, stage: str, data: dict) -> dict:
    """Write a stage's result to --work/results/STAGE.json and --out/peers_STAGE.json."""
    results = Path(args.work) / "results"
    results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)
    (results / f"{stage}.json").write_text(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"peers_{stage}.json").write_text(text)
    return data


def model_bytes(layers: int, tiny: bool) -> int:
    """bf16 bytes of the model's weights (meta device: nothing allocated)."""
    with torch.device("meta"):
        model = build_model(layers, 0, "meta", tiny)
    return 2 * sum(p.numel() for p in model.parameters())


def ensure_checkpoint(args, ckpt: Path, layers: int) -> dict:
    """The seeded random model saved as a Hugging Face checkpoint (once per --work)."""
    done = ckpt / "finemoe-saved"
    if done.is_file():
        return json.loads(done.read_text())
    need = 2 * model_bytes(layers, args.tiny)             # the checkpoint and its GGUF
    free = shutil.disk_usage(ckpt.parent).free
    if free < need:
        raise SystemExit(f"--work {ckpt.parent}: {free / 1e9:.1f} GB free, the checkpoint and its GGUF need "
                         f"{need / 1e9:.1f} GB; free disk space or use a trace with fewer layers")
    t0 = time.perf_counter()
    model = build_model(layers, 0, args.device, args.tiny)
    save_checkpoint(model, ckpt)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    info = {"checkpoint": str(ckpt), "layers": layers, "seed": 0, "bytes": need // 2,
            "save_s": time.perf_counter() - t0}
    done.write_text(json.dumps(info))
    return info


def stage_convert(args, ckpt: Path, gguf: Path, layers: int) -> dict:
    info = ensure_checkpoint(args, ckpt, layers)
    if not gguf.is_file():
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, str(CONVERTER), "--llama-cpp", args.llama_cpp, "--model", str(ckpt),
                              "--out", str(gguf) + ".part"], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"GGUF conversion failed: {res.stderr.strip()[-1500:]}")
        os.replace(str(gguf) + ".part", gguf)
        info["convert_s"] = time.perf_counter() - t0
    info.update(gguf=str(gguf), gguf_bytes=gguf.stat().st_size)
    return info


def stage_llamacpp(args, binary: Path, gguf: Path, layers: int, gpu_expert_layers: int, prompt: int,
                   gen: int) -> dict:
    if not binary.is_file():
        raise SystemExit(f"{binary}: not built; run the build stage first (same --work, same --device)")
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: no GGUF; run the convert stage first (same --work)")
    cuda = args.device == "cuda"
    places = llamacpp.placements(layers, gpu_expert_layers) if cuda else []
    threads = [int(t) for t in args.llama_threads.split(",")] if args.llama_threads else [os.cpu_count()]
    cmd = llamacpp.bench_command(binary, gguf, [p.cpu_moe_layers for p in places], prompt, gen, threads,
                                 args.llama_reps, cuda)
    t0 = time.perf_counter()
    tests = llamacpp.run_bench(cmd, timeout=max(args.deadline_s - (time.time() - args.t_start), 60))
    rows = llamacpp.pick(tests, prompt)
    names = {p.cpu_moe_layers: p.name for p in places}
    for r in rows:
        r["placement"] = names.get(r["n_cpu_moe"], "CPU backend only (-ngl 0)")
    first = tests[0] if tests else {}
    return {"command": " ".join(cmd), "seconds": time.perf_counter() - t0, "rows": rows, "raw": tests,
            "build_commit": first.get("build_commit"), "build_number": first.get("build_number"),
            "cpu_info": first.get("cpu_info"), "gpu_info": first.get("gpu_info"), "backends": first.get("backends"),
            "source": llamacpp.source_info(Path(args.llama_cpp))}


def stage_accelerate(args, ckpt: Path, trace, held: list[int], gpu_expert_layers: int) -> dict:
    device = torch.device(args.device if args.device == "cpu" else "cuda:0")
    gpu = "cpu" if device.type == "cpu" else 0
    dmap = accelerate_offload.device_map(str(ckpt), gpu_expert_layers, gpu)
    model, load_s = accelerate_offload.load(str(ckpt), dmap)
    idx = held[:args.accelerate_requests]
    accelerate_offload.time_request(model, trace.prompt_ids(idx[0]), 2, device)      # warm-up
    reqs = [accelerate_offload.time_request(model, trace.prompt_ids(r), args.accelerate_new_tokens, device)
            for r in idx]
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    import accelerate
    on_cpu = sorted({k for k, v in dmap.items() if v == "cpu" and accelerate_offload.EXPERTS in k})
    return {"accelerate": accelerate.__version__, "load_s": load_s, "gpu_expert_layers": gpu_expert_layers,
            "cpu_modules": on_cpu, "requests": reqs, "new_tokens": args.accelerate_new_tokens,
            "tpot_s": statistics.median(r["tpot_s"] for r in reqs),
            "ttft_s": statistics.median(r["ttft_s"] for r in reqs),
            "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in reqs)}


def finemoe_row(engine: Engine, reqs: list, trace, idx: list[int], policy: str, budget: str, mode: str) -> dict:
    s = engine.summary(reqs)
    tokens = s["output_tokens"]
    prefill = [int(trace.prompt_lens[r]) / q.metrics.ttft_s for r, q in zip(idx, reqs)]
    return {"policy": policy, "budget": budget, "mode": mode, "tpot_s": s["tpot_s"], "ttft_s": s["ttft_s"],
            "prefill_tokens_per_s": statistics.median(prefill), "hit_rate": s["hit_rate"],
            "bytes_per_token": s["bytes_per_token"], "decode_path": s["decode_path"],
            "cpu_experts_per_token": s["cpu_experts"] / tokens if tokens else 0.0}


def stage_finemoe(args, trace, build_idx: list[int], held: list[int]) -> dict:
    engine = Engine(replayed_model(trace, args.device, args.tiny),
                    EngineConfig(device=args.device, policy="resident", show_progress=False,
                                 cpu_threads=args.cpu_threads))
    replay = RoutingReplay(engine, trace)
    serve_replayed(engine, replay, held[:2])                                        # warm-up
    rows = [finemoe_row(engine, serve_replayed(engine, replay, held), trace, held, "resident", "100%", "gpu")]
    stores = tempfile.mkdtemp(prefix="peers_finemoe_")
    for policy in args.policies.split(","):
        opts = {}
        if policy == "finemoe":
            path = os.path.join(stores, "finemoe.safetensors")
            engine.reconfigure(policy, args.budget, {"map_store": path, "learn": True, "fresh": True},
                               miss_compute="gpu")
            serve_replayed(engine, replay, build_idx)
            opts = {"map_store": path, "learn": False}
        for mode in args.modes.split(","):
            engine.reconfigure(policy, args.budget, opts, miss_compute=mode)
            reqs = serve_replayed(engine, replay, held)
            rows.append(finemoe_row(engine, reqs, trace, held, policy, args.budget, mode))
            print(f"  finemoe {policy} {args.budget} {mode}: TPOT {rows[-1]['tpot_s'] * 1e3:.2f} ms", flush=True)
    cpu_threads = torch.get_num_threads()
    engine.close()
    shutil.rmtree(stores, ignore_errors=True)
    return {"rows": rows, "cpu_threads": cpu_threads, "build_requests": len(build_idx), "torch": torch.__version__}


def table(results: dict, layers: int) -> list[dict]:
    """One row per system configuration; ratio = TPOT / llama.cpp's best all-experts-on-CPU TPOT."""
    rows = []
    for r in results.get("llamacpp", {}).get("rows", []):
        rows.append({"system": "llama.cpp", "config": f"{r['placement']}, {r['n_threads']} threads",
                     "tpot_s": r.get("tpot_s"), "prefill_tokens_per_s": r.get("prefill_tokens_per_s"),
                     "all_experts_on_cpu": r["n_cpu_moe"] == layers or r["n_gpu_layers"] == 0})
    acc = results.get("accelerate")
    if acc:
        rows.append({"system": "accelerate", "config": f"device_map, experts of {acc['gpu_expert_layers']}/{layers} "
                     "layers on GPU", "tpot_s": acc["tpot_s"], "prefill_tokens_per_s": acc["prefill_tokens_per_s"]})
    for r in results.get("finemoe", {}).get("rows", []):
        mode = "exact" if r["mode"] == "gpu" else f"--miss-compute {r['mode']}"
        rows.append({"system": "finemoe", "config": f"{r['policy']} {r['budget']}, {mode}", "tpot_s": r["tpot_s"],
                     "prefill_tokens_per_s": r["prefill_tokens_per_s"], "hit_rate": r["hit_rate"]})
    ref = [r["tpot_s"] for r in rows if r.get("all_experts_on_cpu") and r.get("tpot_s")]
    for r in rows:
        r["vs_llamacpp_cpu_experts"] = r["tpot_s"] / min(ref) if ref and r.get("tpot_s") else None
    return rows


def print_table(rows: list[dict], results: dict, args) -> None:
    build = results.get("build", {})
    src = results.get("llamacpp", {}).get("source") or {}
    print(f"\n{args.device_name}; model Qwen1.5-MoE-A2.7B shapes, {args.layers} layers, random bf16; batch 1; "
          f"prompt {args.prompt_len} tokens (median), {args.gen} decode tokens")
    if build:
        print(f"llama.cpp {src.get('llama_cpp_commit', '?')} (llama-cpp-python {src.get('llama_cpp_python', '?')}); "
              f"build {'done' if build.get('done') else 'NOT finished'} in {build.get('seconds', 0):.0f} s this call")
    print(f"{'system':10s} {'configuration':58s} {'TPOT ms':>8s} {'prefill tok/s':>13s} {'hit':>6s} "
          f"{'/ llama.cpp CPU experts':>23s}")
    for r in rows:
        tpot = f"{r['tpot_s'] * 1e3:8.2f}" if r.get("tpot_s") else f"{'-':>8s}"
        pp = f"{r['prefill_tokens_per_s']:13.0f}" if r.get("prefill_tokens_per_s") else f"{'-':>13s}"
        hit = f"{r['hit_rate']:6.3f}" if "hit_rate" in r else f"{'-':>6s}"
        ratio = f"{r['vs_llamacpp_cpu_experts']:23.2f}" if r.get("vs_llamacpp_cpu_experts") else f"{'-':>23s}"
        print(f"{r['system']:10s} {r['config'][:58]:58s} {tpot} {pp} {hit} {ratio}")
    print("llama.cpp's and accelerate's cost does not depend on which experts are routed; finemoe's does (its cache),"
          " so finemoe replays the trained reference model's routing. finemoe's prefill tok/s = prompt / TTFT.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True, help="routing trace (its layer count sets the model's)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"among {', '.join(STAGES)}")
    ap.add_argument("--llama-cpp", default=str(ROOT / ".carry" / "llama.cpp"), help="trimmed llama.cpp tree")
    ap.add_argument("--work", default="/tmp/finemoe-peers", help="build, checkpoint, GGUF and per-stage results")
    ap.add_argument("--deadline-s", type=float, default=560, help="stop waiting for the build this long after start")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,finemoe")
    ap.add_argument("--modes", default="gpu,auto", help="finemoe --miss-compute modes (gpu = exact)")
    ap.add_argument("--split", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=8)
    ap.add_argument("--build-limit", type=int, default=40)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--llama-threads", default=None, help="llama-bench -t list (default: all cores)")
    ap.add_argument("--llama-reps", type=int, default=3)
    ap.add_argument("--accelerate-requests", type=int, default=2)
    ap.add_argument("--accelerate-new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test of this script)")
    ap.add_argument("--out", default="peers_out", help="folder for the JSON files")
    args = ap.parse_args(argv)
    args.t_start = time.time()
    stages = args.stages.split(",")
    if set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {', '.join(sorted(set(stages) - set(STAGES)))}; among {', '.join(STAGES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu --tiny for the smoke run")
    needs_tree = {"build", "convert"} & set(stages)
    if needs_tree and not (Path(args.llama_cpp) / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-cpp {args.llama_cpp}: no trimmed llama.cpp tree; run "
                         "benchmarks/peers/prepare_llamacpp.py (and carry .carry)")
    trace = load_trace(args.trace)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layers = args.layers = trace.num_layers
    build_idx, held = shuffled_split(trace.num_requests, args.split, args.seed)
    build_idx, held = build_idx[:args.build_limit].tolist(), held[:args.eval_limit].tolist()
    args.prompt_len = prompt = int(round(statistics.median(int(trace.prompt_lens[r]) for r in held)))
    args.gen = gen = int(max(int(trace.iterations[r]) for r in held))
    gpu_expert_layers = round(float(args.budget.rstrip("%")) / 100 * layers)
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tag = f"qwen15moe-L{layers}" + ("-tiny" if args.tiny else "")
    ckpt, gguf = work / f"ckpt-{tag}", work / f"{tag}-bf16.gguf"
    cuda = args.device == "cuda"

    build = llamacpp.start_build(Path(args.llama_cpp), work, cuda, args.jobs) if "build" in stages else None
    if "convert" in stages:
        print(json.dumps(record(args, "convert", stage_convert(args, ckpt, gguf, layers))), flush=True)
    if build is not None:
        res = record(args, "build", build.wait(args.t_start + args.deadline_s))
        print(f"build: {'done' if res['done'] else 'not finished (run the build stage again)'} "
              f"after {res['seconds']:.0f} s", flush=True)
        if not res["done"] and res["returncode"] not in (None, 0):
            print(res["log_tail"], flush=True)
    binary = (build or llamacpp.existing_build(work, cuda)).binary
    if "llamacpp" in stages:
        record(args, "llamacpp", stage_llamacpp(args, binary, gguf, layers, gpu_expert_layers, prompt, gen))
    if "accelerate" in stages:
        ensure_checkpoint(args, ckpt, layers)
        record(args, "accelerate", stage_accelerate(args, ckpt, trace, held, gpu_expert_layers))
    if "finemoe" in stages:
        record(args, "finemoe", stage_finemoe(args, trace, build_idx, held))

    results = {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))}
    rows = table(results, layers)
    combined = {"device": args.device_name, "layers": layers, "prompt_tokens": prompt, "decode_tokens": gen,
                "held_out_requests": held, "budget": args.budget, "gpu_expert_layers": gpu_expert_layers,
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "trace": args.trace, "table": rows,
                "stages": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "peers.json").write_text(json.dumps(combined, indent=1))
    print_table(rows, results, args)
    return combined


if __name__ == "__main__":
    main()
