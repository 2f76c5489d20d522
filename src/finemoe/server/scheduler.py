"""The engine loop: ONE thread owns the (not thread-safe) engine and batches queued requests.

Batching: the thread takes up to `max_batch_size` queued requests (right after a batch of n ends it
waits up to `batch_wait_s` for n to be queued), runs them as one BatchRunner
(decode steps of the batch share a forward pass) and steps it until every row has finished.
Requests that arrive meanwhile wait and join the NEXT batch: the engine has no in-flight joining.
A row leaves its batch at the next step once it finishes or its client goes away (`Job.cancel`).

After every step each row that produced output gets an `Event` (a snapshot, never the live request)
on its asyncio queue, via `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from finemoe.engine import Request
from finemoe.engine.batch import BatchRunner

log = logging.getLogger("finemoe.server")
IDLE_WAKEUP_S = 0.5   # how often an idle loop wakes to run periodic saves


@dataclass(frozen=True)
class Event:
    """The request's state after one step: its whole decoded text so far (stop strings cut)."""

    text: str
    completion_tokens: int
    finish_reason: str | None     # None while running; "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Job:
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False       # set by the HTTP side; applied by the scheduler between steps
    done: bool = False            # set by the scheduler once the final event is queued

    def cancel(self) -> None:
        self.cancelled = True

    def push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            pass


class Scheduler:
    def __init__(self, engine, metrics, persistence, max_batch_size: int, batch_wait_s: float = 0.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.persistence = persistence
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._last_batch = (0, 0.0)   # (size, perf_counter time it ended) of the previous batch
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.running = 0
        self.policy_state: dict = {}  # JSON scalars of engine.policy.state_dict(), refreshed by the engine thread
        self._thread = threading.Thread(target=self._loop, name="finemoe-engine", daemon=True)

    # ---- called from the asyncio side ------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                job.done = True
                job.push(Event("", 0, "cancelled", "the server is shutting down or its engine thread has stopped"))
                return
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running and queued requests, then close the engine (saves a persisting policy)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                if batch:
                    self._run_batch(batch)
                self._refresh_policy_state()
                self.persistence.tick()
        except Exception:
            log.exception("the engine thread stopped on an error; /health now reports unavailable")
        finally:
            with self._cv:   # from here on submit() refuses new jobs
                self._stopping = True
                self._finish_all(list(self._pending), "cancelled")
                self._pending.clear()
            self.persistence.close()

    def _next_batch(self) -> list[Job] | None:
        """Up to max_batch_size live jobs ([] after an idle wakeup); None once stopping. Clients that finish
        together tend to come back together: for up to batch_wait_s after a batch of n ended, a new batch
        waits for n requests. Otherwise whatever is queued starts at once."""
        with self._cv:
            if not self._pending and not self._stopping:
                self._cv.wait(IDLE_WAKEUP_S)
            expect = min(self._last_batch[0], self.max_batch_size)
            while self._pending and len(self._pending) < expect and not self._stopping:
                left = self._last_batch[1] + self.batch_wait_s - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._stopping:
                return None
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                job = self._pending.popleft()
                if job.cancelled:
                    self._finish(job, "cancelled")
                else:
                    batch.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        self.running = len(jobs)
        self.metrics.running.set(len(jobs))
        self.metrics.batch_size.observe(len(jobs))
        try:
            runner = BatchRunner(self.engine, [j.request for j in jobs])
            while not runner.done:
                for j in jobs:
                    if j.cancelled or self._stopping:
                        j.request.cancel()
                produced = {id(r) for r, _ in runner.step()}
                self.metrics.on_step(self.engine)
                for j in jobs:
                    if not j.done and (id(j.request) in produced or j.request.finished):
                        self._publish(j)
                self.persistence.tick()
        except Exception:
            log.exception("engine step failed; failing the %d requests of this batch", len(jobs))
            for j in jobs:
                if not j.done:
                    self._finish(j, "error", "the engine failed while running this request (see the server log)")
        finally:
            self.running = 0
            self.metrics.running.set(0)
            self._last_batch = (len(jobs), time.perf_counter())

    def _refresh_policy_state(self) -> None:
        state = self.engine.policy.state_dict()
        self.policy_state = {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str))}

    def _publish(self, job: Job) -> None:
        r = job.request
        if r.finished:
            job.done = True
            self.metrics.on_request_done(r)
        shutdown = r.finish_reason == "cancelled" and self._stopping and not job.cancelled
        job.push(Event(r.text, len(r.output_ids), r.finish_reason, "the server is shutting down" if shutdown else None))

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        job.done = True
        self.metrics.requests.labels(reason).inc()
        job.push(Event(job.request.text, len(job.request.output_ids), reason, error))

    def _finish_all(self, jobs: list[Job], reason: str) -> None:
        for j in jobs:
            if not j.done:
                self._finish(j, reason, "the server is shutting down" if reason == "cancelled" else None)
