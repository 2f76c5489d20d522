"""Is a packed expert (experts/codec.py: 12 bits per bf16 weight, lossless) ready on the GPU sooner than a plain one?

For experts of Qwen1.5-MoE-A2.7B's shape (hidden 2048, expert intermediate 1408, gate, up and down bf16 tensors,
17.3 MB; normal(0, 0.02) weights, transformers' initialisation; `--experts` of them cycled so that no copy reads
what the last one did), with CUDA events, medians over `--repeat` runs after a warm-up:
  plain     n experts copied from pinned host memory into device slots on one copy stream, back to back
  packed    the same n experts' packed buffers and escapes copied into a ring of device staging buffers on the copy
            stream; a second stream unpacks each into its slot as soon as its copy lands (eager torch, and the same
            function under torch.compile), the copy stream reusing a staging buffer only after its unpack
for n = 1, 2, 4, 8: time from the first copy's start to the n-th expert ready in its slot; plus one expert's unpack
alone. Every unpacked slot is checked bit for bit against the plain copy. Prints a short table last; `--out FILE`
writes every number as JSON.

    PYTHONPATH=src:benchmarks python3 benchmarks/expert_codec_gpu.py --out $OUT/codec.json

`--device cpu --tiny` is the smoke mode (tiny shapes; host "copies"; tests/test_expert_codec_script.py).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks_common import device_name, write_json
from finemoe.experts import codec

COUNTS = (1, 2, 4, 8)


class Experts:
    """`count` experts of `shapes` as pinned plain tensors and their packed forms, and device slots for `slots`."""

    def __init__(self, shapes: list[tuple[int, int]], count: int, slots: int, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        pin = device.type == "cuda"
        self.plain = [[(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for s in shapes] for _ in range(count)]
        self.packed = [[codec.pack(t) for t in e] for e in self.plain]
        if pin:
            self.plain = [[t.pin_memory() for t in e] for e in self.plain]
            self.packed = [[codec.Packed(p.data.pin_memory(), p.base, p.esc_pos.pin_memory(), p.esc_val.pin_memory(),
                                         p.numel) for p in e] for e in self.packed]
        self.bases = [[torch.tensor(p.base, dtype=torch.uint8, device=device) for p in e] for e in self.packed]
        self.slots = [[torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes] for _ in range(slots)]
        self.check = [[torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes] for _ in range(slots)]
        self.max_escapes = max(p.esc_pos.numel() for e in self.packed for p in e)

    @property
    def plain_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.plain[0])

    @property
    def packed_bytes(self) -> float:
        return statistics.mean(sum(p.nbytes for p in e) for e in self.packed)


class Staging:
    """A ring of device buffers for packed experts, with the events that order copies and unpacks."""

    def __init__(self, ex: Experts, ring: int, device: torch.device):
        cuda = device.type == "cuda"
        self.data = [[torch.empty_like(p.data, device=device) for p in ex.packed[0]] for _ in range(ring)]
        E = max(ex.max_escapes, 1)
        self.pos = [[torch.empty(E, dtype=torch.int64, device=device) for _ in ex.packed[0]] for _ in range(ring)]
        self.val = [[torch.empty(E, dtype=torch.int16, device=device) for _ in ex.packed[0]] for _ in range(ring)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(ring)]
        self.freed = [torch.cuda.Event() if cuda else None for _ in range(ring)]
        self.used = [False] * ring


def run_plain(ex: Experts, first: int, n: int, copy_stream) -> None:
    for i in range(n):
        src = ex.plain[(first + i) % len(ex.plain)]
        with torch.cuda.stream(copy_stream) if copy_stream is not None else _null():
            for dst, t in zip(ex.check[i % len(ex.check)], src):
                dst.copy_(t, non_blocking=True)


def run_packed(ex: Experts, st: Staging, first: int, n: int, unpack, copy_stream, unpack_stream) -> None:
    ring = len(st.data)
    for i in range(n):
        e, j = (first + i) % len(ex.packed), i % ring
        with torch.cuda.stream(copy_stream) if copy_stream is not None else _null():
            if copy_stream is not None and st.used[j]:
                copy_stream.wait_event(st.freed[j])
            for k, p in enumerate(ex.packed[e]):
                st.data[j][k].copy_(p.data, non_blocking=True)
                E = p.esc_pos.numel()
                st.pos[j][k][:E].copy_(p.esc_pos, non_blocking=True)
                st.val[j][k][:E].copy_(p.esc_val, non_blocking=True)
            if copy_stream is not None:
                st.copied[j].record(copy_stream)
        with torch.cuda.stream(unpack_stream) if unpack_stream is not None else _null():
            if unpack_stream is not None:
                unpack_stream.wait_event(st.copied[j])
            for k, p in enumerate(ex.packed[e]):
                out = ex.slots[i % len(ex.slots)][k]
                unpack(st.data[j][k], ex.bases[e][k], out)
                E = p.esc_pos.numel()
                codec.write_escapes(st.pos[j][k][:E], st.val[j][k][:E], out)
            if unpack_stream is not None:
                st.freed[j].record(unpack_stream)
                st.used[j] = True


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def timed(fn, repeat: int, cuda: bool, streams: list) -> float:
    """Median seconds of fn(first) from before its first operation to after every stream's last one."""
    import time
    fn(0)
    times = []
    for r in range(repeat):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(streams[0])
            for s in streams[1:]:
                s.wait_event(start)
            fn(r * 8 + 1)
            for s in streams[1:]:
                streams[0].wait_stream(s)
            end.record(streams[0])
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(r * 8 + 1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--ring", type=int, default=4, help="staging buffers for packed experts")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    H, F = (64, 48) if args.tiny else (2048, 1408)
    shapes = [(F, H), (F, H), (H, F)]
    ex = Experts(shapes, args.experts, max(COUNTS), device, args.seed)
    st = Staging(ex, args.ring, device)
    copy_stream = torch.cuda.Stream(device) if cuda else None
    unpack_stream = torch.cuda.Stream(device) if cuda else None
    unpackers = {"eager": codec.unpack_into}
    compile_error = None
    if args.compile and cuda:
        try:
            fn = torch.compile(codec.unpack_into, fullgraph=True, dynamic=False)
            p = ex.packed[0][0]
            fn(st.data[0][0].copy_(p.data), ex.bases[0][0], ex.slots[0][0])    # compiles now, not while timed
            unpackers["compiled"] = fn
        except Exception as e:   # recorded, the eager rows still run
            compile_error = f"{type(e).__name__}: {e}"
    result = {"device": device_name(args.device), "torch": torch.__version__, "shapes": [list(s) for s in shapes],
              "experts_cycled": args.experts, "ring": args.ring, "repeat": args.repeat,
              "plain_bytes": ex.plain_bytes, "packed_bytes_mean": ex.packed_bytes,
              "escapes_max": ex.max_escapes, "compile_error": compile_error, "plain_s": {}, "packed_s": {},
              "unpack_one_s": {}}
    for n in COUNTS:
        result["plain_s"][str(n)] = timed(lambda f, n=n: run_plain(ex, f, n, copy_stream), args.repeat, cuda,
                                          [copy_stream] if cuda else [])
    for name, fn in unpackers.items():
        for n in COUNTS:
            result["packed_s"][f"{name}/{n}"] = timed(
                lambda f, n=n, fn=fn: run_packed(ex, st, f, n, fn, copy_stream, unpack_stream), args.repeat, cuda,
                [copy_stream, unpack_stream] if cuda else [])
        for j, p in enumerate(ex.packed[0]):
            st.data[0][j].copy_(p.data)
        result["unpack_one_s"][name] = timed(
            lambda f, fn=fn: [fn(st.data[0][k], ex.bases[0][k], ex.slots[0][k]) for k in range(len(shapes))],
            args.repeat, cuda, [torch.cuda.current_stream(device)] if cuda else [])
        # bit-exact: every slot of the last n-expert run against its plain copy
        if cuda:
            torch.cuda.synchronize()
        n, first = max(COUNTS), 12345
        run_packed(ex, st, first, n, fn, copy_stream, unpack_stream)
        run_plain(ex, first, n, copy_stream)
        if cuda:
            torch.cuda.synchronize()
        result[f"bit_exact_{name}"] = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                          for slot, chk in zip(ex.slots, ex.check) for a, b in zip(slot, chk))
    write_json(args.out, result)
    print(f"{result['device']}; expert {ex.plain_bytes / 1e6:.2f} MB plain, {ex.packed_bytes / 1e6:.2f} MB packed "
          f"(escapes <= {ex.max_escapes}); unpack of one expert: "
          + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in result["unpack_one_s"].items())
          + (f"; compile failed: {compile_error}" if compile_error else ""))
    print(f"{'experts':>7s} {'plain ms':>9s} " + " ".join(f"{k + ' ms':>12s} {'ratio':>6s}" for k in unpackers)
          + " " + " ".join(f"{'exact ' + k:>14s}" for k in unpackers))
    for n in COUNTS:
        plain = result["plain_s"][str(n)]
        cells = " ".join(f"{result['packed_s'][f'{k}/{n}'] * 1e3:12.3f} {result['packed_s'][f'{k}/{n}'] / plain:6.2f}"
                         for k in unpackers)
        exact = " ".join(f"{str(result[f'bit_exact_{k}']):>14s}" for k in unpackers)
        print(f"{n:7d} {plain * 1e3:9.3f} {cells} {exact}")
    return result


if __name__ == "__main__":
    main()
