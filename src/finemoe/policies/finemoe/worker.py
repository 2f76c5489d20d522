"""Running search beside inference: device snapshots of router outputs and a search worker thread.

`SnapshotRing` copies a small per-layer device tensor non-blocking into a pinned host buffer that is
allocated once per layer and reused every iteration, and records that layer's event; only the worker
waits on it. `SearchWorker` runs jobs in order on one thread and hands results back to the engine
thread without blocking it; `InlineWorker` runs them at once (CPU runs, tests, deterministic
measurements). Both take a job as (function, argument) so the engine thread builds no closure per layer.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable

import torch


class HostSnapshot:
    """A host view of a device tensor, ready once `wait()` returns."""

    def __init__(self, host: torch.Tensor, event: Any = None) -> None:
        self.host, self.event = host, event

    def wait(self) -> torch.Tensor:
        """Blocks the calling (worker) thread until the copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


class SnapshotRing:
    """One reusable pinned buffer [rows, cols] and one event per layer (CUDA); a plain reference on the CPU.

    Reuse is safe because the policy waits for the worker to go idle at every iteration start, so a
    layer's buffer is never overwritten while the worker may still read the previous iteration's copy."""

    def __init__(self, num_layers: int) -> None:
        self.buffers: list[torch.Tensor | None] = [None] * num_layers
        self.events: list[Any] = [None] * num_layers

    def take(self, layer: int, t: torch.Tensor) -> HostSnapshot:
        """Start copying `t` [B, J] (float32) to the host; no host sync."""
        if t.device.type != "cuda":
            return HostSnapshot(t)
        buf = self.buffers[layer]
        if buf is None or buf.shape[0] < t.shape[0] or buf.shape[1:] != t.shape[1:] or buf.dtype != t.dtype:
            buf = torch.empty((max(t.shape[0], 8),) + tuple(t.shape[1:]), dtype=t.dtype, pin_memory=True)
            self.buffers[layer] = buf
            self.events[layer] = torch.cuda.Event()
        host = buf[: t.shape[0]]
        host.copy_(t, non_blocking=True)
        self.events[layer].record()
        return HostSnapshot(host, self.events[layer])


class InlineWorker:
    """Runs each job on the calling thread at submission."""

    def __init__(self) -> None:
        self.results: deque = deque()

    def submit(self, fn: Callable[[Any], Any], arg: Any = None) -> None:
        out = fn(arg)
        if out is not None:
            self.results.append(out)

    def drain(self) -> list:
        """Results so far, in submission order (deque pops are atomic: no lock needed)."""
        out, results = [], self.results
        while results:
            out.append(results.popleft())
        return out

    def wait_idle(self) -> None:
        """Nothing is ever pending."""

    def stop(self) -> None:
        """Nothing to stop."""


class DeferredWorker(InlineWorker):
    """Runs each job at submission but hands its result out one `drain` later: a deterministic model of
    the worker thread, whose search for layer l usually lands after layer l's own `drain` (at 0.35 ms per
    layer on an H100). The simulator uses it (`async_search=deferred`) to predict the engine's timing."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def submit(self, fn: Callable[[Any], Any], arg: Any = None) -> None:
        out = fn(arg)
        if out is not None:
            self.held.append(out)

    def drain(self) -> list:
        out = super().drain()
        self.results.extend(self.held)
        self.held = []
        return out

    def wait_idle(self) -> None:
        """Results held back become visible (as the thread's would once it is idle)."""
        self.results.extend(self.held)
        self.held = []


class SearchWorker(InlineWorker):
    """One daemon thread; jobs run in submission order. An exception in a job is re-raised on the
    engine thread at the next `drain`/`wait_idle`."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="finemoe-search", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        # inference mode is thread-local: the engine thread's tensors are inference tensors, so the
        # worker must run in inference mode too to update them in place
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        get, results = self.jobs.get, self.results
        while True:
            fn, arg = get()
            if fn is None:
                if arg is None:
                    return
                arg.set()                                   # a barrier: every earlier job has run
                continue
            try:
                out = fn(arg)
                if out is not None:
                    results.append(out)
            except BaseException as e:  # surfaced on the engine thread
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"finemoe search worker failed: {err}") from err

    def submit(self, fn: Callable[[Any], Any], arg: Any = None) -> None:
        self.jobs.put((fn, arg))

    def drain(self) -> list:
        self._raise()
        return super().drain()

    def wait_idle(self) -> None:
        done = threading.Event()
        self.jobs.put((None, done))
        done.wait()
        self._raise()

    def stop(self) -> None:
        self.jobs.put((None, None))
        self.thread.join(timeout=10)
