"""Running search beside inference: device snapshots of router outputs and a search worker thread.

`HostSnapshot` starts a non-blocking copy of a small device tensor into pinned host memory and records
an event; only the worker waits on it. `SearchWorker` runs jobs in order on one thread and hands
results back to the engine thread without blocking it; `InlineWorker` runs them at once (CPU runs,
tests, deterministic measurements).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable

import torch


class HostSnapshot:
    """A copy of `t` on the host. On CUDA: pinned buffer + non-blocking copy + event (no host sync)."""

    def __init__(self, t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = t, None

    def wait(self) -> torch.Tensor:
        """Blocks the calling (worker) thread until the copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


class InlineWorker:
    def __init__(self) -> None:
        self.results: deque = deque()

    def submit(self, job: Callable[[], Any]) -> None:
        out = job()
        if out is not None:
            self.results.append(out)

    def drain(self) -> list:
        out = list(self.results)
        self.results.clear()
        return out

    def wait_idle(self) -> None:
        """Nothing is ever pending."""

    def stop(self) -> None:
        """Nothing to stop."""


class SearchWorker(InlineWorker):
    """One daemon thread; jobs run in submission order. An exception in a job is re-raised on the
    engine thread at the next `drain`/`wait_idle`."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="finemoe-search", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        # inference mode is thread-local: the engine thread's tensors are inference tensors, so the
        # worker must run in inference mode too to update them in place
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                out = job()
                if out is not None:
                    with self.lock:
                        self.results.append(out)
            except BaseException as e:  # surfaced on the engine thread
                self.error = e
            finally:
                self.jobs.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"finemoe search worker failed: {err}") from err

    def submit(self, job: Callable[[], Any]) -> None:
        self.jobs.put(job)

    def drain(self) -> list:
        self._raise()
        with self.lock:
            return super().drain()

    def wait_idle(self) -> None:
        self.jobs.join()
        self._raise()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)
