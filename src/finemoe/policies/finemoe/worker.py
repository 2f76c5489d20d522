"""Running search beside inference: a search worker thread, or inline and deferred stand-ins.

The engine hands the policy each layer's router probabilities already on the host (engine/snapshots.py).
`SearchWorker` runs jobs in order on one thread and hands results back to the engine thread without
blocking it; `InlineWorker` runs them at once (CPU runs, tests, deterministic measurements);
`DeferredWorker` models the thread's delay for the simulator. All take a job as (function, argument) so
the engine thread builds no closure per layer.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable

import torch


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
