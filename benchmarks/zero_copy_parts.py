"""Pieces of benchmarks/zero_copy_miss.py: experts held in page-locked host memory and seen by the device in
place (zero-copy), and a timeline of CUDA events with a spin that holds the device until a rep is issued."""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
GU, DOWN = "gate_up_proj", "down_proj"
SPIN_CYCLES = 4_000_000                                  # ~2 ms at H100 clocks; measured as `spin_ms`


class ZeroCopyError(RuntimeError):
    """The device cannot read the pinned host memory in place, or a method computed on other weights."""


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert as transformers v5 computes it: x [M, H], gate_up [2I, H], down [H, I] -> [M, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)      # [M, I] each
    return F.linear(F.silu(gate) * up, down)             # [M, I] @ [I, H] -> [M, H]


def map_to_device(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the registered memory of `host` itself (the same address under UVA; no copy), through
    the CUDA array interface v3. bf16 has no numpy typestr, hence int16. torch keeps the offering object, which
    holds `host`, alive as long as the device tensor."""
    assert host.element_size() == 2 and host.is_contiguous()
    offer = SimpleNamespace(host=host, __cuda_array_interface__={
        "shape": tuple(host.shape), "typestr": "<i2", "data": (host.data_ptr(), False), "version": 3, "strides": None})
    try:
        dev = torch.as_tensor(offer, device=torch.device("cuda", torch.cuda.current_device()))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ZeroCopyError(f"torch refused the registered host pointer as a CUDA array ({e}): zero-copy needs "
                            "page-locked host memory that the device maps at the same address (UVA)") from e
    dev = dev.view(host.dtype)
    if dev.device.type != "cuda" or dev.data_ptr() != host.data_ptr():
        raise ZeroCopyError(f"torch.as_tensor copied the host memory instead of wrapping it "
                            f"({dev.device}, {dev.data_ptr():#x} != {host.data_ptr():#x})")
    return dev


def check_alias(host: torch.Tensor, view: torch.Tensor, sync) -> dict:
    """Write one value on the host side, then read it through `view` with a device kernel: `view` must alias."""
    h, v = host.view(-1), view.view(-1)
    old = h[0].clone()
    probe = -3.25 if float(old) != -3.25 else 5.5
    h[0] = probe
    try:
        sync()
        seen = float(v[:1].float().cpu())                 # .float() is a kernel reading the host memory
    except RuntimeError as e:
        raise ZeroCopyError(f"a device kernel could not read the pinned host memory through the view ({e})") from e
    finally:
        h[0] = old
    if seen != probe:
        raise ZeroCopyError(f"wrote {probe} into host memory but read {seen} through the device view: it is a copy")
    return {"probe": probe, "seen": seen}


class ExpertPool:
    """`pool` experts of one layer three ways, each a dict name -> [pool, *shape]: `host` (page-locked on CUDA,
    as HostExpertStore does), `mapped` (those host bytes as device tensors; on the CPU the host tensors) and
    `resident` (a device copy)."""

    def __init__(self, hidden: int, inter: int, pool: int, device: torch.device, seed: int = 0) -> None:
        shapes = {GU: (2 * inter, hidden), DOWN: (hidden, inter)}
        g = torch.Generator(device=device).manual_seed(seed)
        self.resident = {n: (torch.randn((pool, *s), generator=g, device=device) * 0.02).to(DTYPE)
                         for n, s in shapes.items()}
        self.host = {n: torch.empty((pool, *s), dtype=DTYPE) for n, s in shapes.items()}
        self.pinned = device.type == "cuda"
        for n, t in self.host.items():
            if self.pinned:
                err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                if int(err) != 0:
                    raise ZeroCopyError(f"cudaHostRegister failed ({err}): is the host lock limit (ulimit -l) too low?")
            t.copy_(self.resident[n])
        self.mapped = {n: map_to_device(t) if self.pinned else t for n, t in self.host.items()}
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in self.host.values())

    def close(self) -> None:
        self.mapped = {}
        if self.pinned:
            torch.cuda.synchronize()                      # nothing may still read the memory
            for t in self.host.values():
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            self.pinned = False


class Timeline:
    """Marks and stream order. CUDA: events on the compute (current) stream and a side copy stream; `hold` queues
    a spin kernel so the device starts a rep only once the host has issued all of it. CPU (dry run): the host
    clock, one stream, copies done when issued; its times claim nothing."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.spin_ms = cuda, 0.0
        self.compute, self.side = (torch.cuda.current_stream(), torch.cuda.Stream()) if cuda else (None, None)
        for _ in range(2 if cuda else 0):                 # the first spin warms up, the second is timed
            a = self.mark()
            self.hold()
            b = self.mark()
            self.sync()
            self.spin_ms = self.elapsed_ms(a, b)

    def mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record(self.compute if stream is None else stream)
        return e

    def start(self):
        """A mark on the compute stream that the side stream waits for too: nothing of the rep runs before it."""
        m = self.mark()
        self.wait(self.side, m)
        return m

    def wait(self, stream, mark) -> None:
        """`stream` (None: the compute stream) waits for `mark`."""
        if self.cuda:
            (self.compute if stream is None else stream).wait_event(mark)

    def hold(self) -> None:
        if self.cuda:
            torch.cuda._sleep(SPIN_CYCLES)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3
