"""The chunk size of the idle prefetch issue rule (experts/prefetch_issue.py), measured: copy throughput against how
long a demand copy waits behind prefetch copies.

1. Throughput: one expert's bytes (--expert-bytes, default one Qwen1.5-MoE-A2.7B expert, 17,301,504 B) copied
   host (pinned) -> device as back-to-back chunks of each size (0.5 to 17 MB) on one copy stream, timed with CUDA
   events around the whole expert (median of --repeat): GB/s per chunk size. Small chunks pay a per-copy cost.
2. Demand latency: a demand copy of one expert issued right behind prefetch work on the same stream (CUDA streams are
   FIFO), host clock from its issue to its completion event (median of --repeat):
     none      nothing queued ahead (the floor)
     inflight  --inflight whole prefetch copies queued ahead (the cache's default rule, prefetch_inflight = 4)
     idle      one prefetch chunk of each size in flight ahead (the idle rule's worst case when it mispredicts)
The chunk size to choose is the smallest whose throughput is within a few percent of whole copies.

    python3 benchmarks/copy_chunks.py --out copy_chunks.json          # on the GPU host
    python3 benchmarks/copy_chunks.py --smoke --device cpu            # seconds, CPU (tests)

On a CPU device the copies are synchronous memcpys (no overlap: only a smoke test of the script).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks_common import write_json

EXPERT_BYTES = 17_301_504
SIZES_MB = (0.5, 1.0, 2.0, 4.0, 8.0, 17.3)
ALIGN = 256


def chunk_sizes(sizes_mb, expert_bytes: int) -> list[int]:
    """Chunk sizes in bytes, multiples of ALIGN, at most one expert."""
    return sorted({min(expert_bytes, max(ALIGN, int(mb * 1e6) // ALIGN * ALIGN)) for mb in sizes_mb})


class Copier:
    """Pinned host buffers of `n` experts and one device buffer, copies on a dedicated stream (CUDA) or memcpy."""

    def __init__(self, expert_bytes: int, n: int, device: torch.device) -> None:
        self.device, self.nbytes = device, expert_bytes
        cuda = device.type == "cuda"
        self.src = [torch.randint(0, 255, (expert_bytes,), dtype=torch.uint8).pin_memory() if cuda
                    else torch.randint(0, 255, (expert_bytes,), dtype=torch.uint8) for _ in range(n)]
        self.dst = [torch.empty(expert_bytes, dtype=torch.uint8, device=device) for _ in range(n)]
        self.stream = torch.cuda.Stream(device) if cuda else None

    def issue(self, i: int, lo: int, hi: int) -> None:
        """Bytes [lo, hi) of expert i: non_blocking on the copy stream (CUDA), or a memcpy now."""
        if self.stream is None:
            self.dst[i][lo:hi].copy_(self.src[i][lo:hi])
            return
        with torch.cuda.stream(self.stream):
            self.dst[i][lo:hi].copy_(self.src[i][lo:hi], non_blocking=True)

    def issue_chunked(self, i: int, chunk: int) -> None:
        for lo in range(0, self.nbytes, chunk):
            self.issue(i, lo, min(self.nbytes, lo + chunk))

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def throughput_GBps(c: Copier, chunk: int, repeat: int) -> float:
    """One expert in chunks of `chunk` bytes, GB/s (CUDA events on the copy stream; wall time on a CPU)."""
    times = []
    for r in range(repeat + 1):
        if c.stream is None:
            t0 = time.perf_counter()
            c.issue_chunked(0, chunk)
            dt = time.perf_counter() - t0
        else:
            c.sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(c.stream)
            c.issue_chunked(0, chunk)
            end.record(c.stream)
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        if r:                                           # the first is a warm-up
            times.append(dt)
    return c.nbytes / statistics.median(times) / 1e9


def demand_latency_ms(c: Copier, ahead: list[tuple[int, int, int]], repeat: int) -> float:
    """Issue the prefetch copies `ahead` ((expert, lo, hi) each), then a whole demand copy of the last expert:
    host ms from the demand's issue to its completion (median)."""
    demand = len(c.src) - 1
    times = []
    for r in range(repeat + 1):
        c.sync()
        for i, lo, hi in ahead:
            c.issue(i, lo, hi)
        t0 = time.perf_counter()
        c.issue(demand, 0, c.nbytes)
        if c.stream is not None:
            done = torch.cuda.Event()
            done.record(c.stream)
            done.synchronize()
        dt = time.perf_counter() - t0
        if r:
            times.append(dt)
    return statistics.median(times) * 1e3


def run(expert_bytes: int, sizes: list[int], inflight: int, repeat: int, device: torch.device) -> dict:
    c = Copier(expert_bytes, inflight + 1, device)
    whole = throughput_GBps(c, expert_bytes, repeat)
    rows = []
    for chunk in sizes:
        rows.append({"chunk_bytes": chunk, "GBps": throughput_GBps(c, chunk, repeat),
                     "demand_ms_behind_one_chunk": demand_latency_ms(c, [(0, 0, chunk)], repeat)})
    none = demand_latency_ms(c, [], repeat)
    behind_inflight = demand_latency_ms(c, [(i, 0, expert_bytes) for i in range(inflight)], repeat)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "expert_bytes": expert_bytes, "repeat": repeat, "inflight": inflight, "whole_copy_GBps": whole,
            "demand_ms_alone": none, "demand_ms_behind_inflight": behind_inflight, "chunks": rows}


def table(result: dict) -> str:
    lines = [f"device {result['device']}   expert {result['expert_bytes']} B   whole copy "
             f"{result['whole_copy_GBps']:.1f} GB/s   demand alone {result['demand_ms_alone']:.3f} ms   "
             f"behind {result['inflight']} whole prefetches (inflight) {result['demand_ms_behind_inflight']:.3f} ms",
             "| chunk MB | GB/s | vs whole | demand ms behind one chunk (idle) |", "|---|---|---|---|"]
    for r in result["chunks"]:
        lines.append(f"| {r['chunk_bytes'] / 1e6:.3g} | {r['GBps']:.1f} | {r['GBps'] / result['whole_copy_GBps']:.2f} "
                     f"| {r['demand_ms_behind_one_chunk']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-bytes", type=int, default=EXPERT_BYTES)
    p.add_argument("--sizes-mb", default=",".join(str(s) for s in SIZES_MB), help="comma-separated chunk sizes (MB)")
    p.add_argument("--inflight", type=int, default=4, help="whole prefetch copies ahead of the demand (inflight)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="64 KiB experts, 3 repeats (a test of the script)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    expert_bytes, repeat = (65536, 3) if args.smoke else (args.expert_bytes, args.repeat)
    sizes_mb = [float(s) for s in args.sizes_mb.split(",")]
    sizes = chunk_sizes([s * expert_bytes / EXPERT_BYTES for s in sizes_mb] if args.smoke else sizes_mb, expert_bytes)
    result = run(expert_bytes, sizes, args.inflight, repeat, torch.device(args.device))
    write_json(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
