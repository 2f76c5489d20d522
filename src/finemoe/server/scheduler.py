"""The engine loop: ONE thread owns the (not thread-safe) engine and schedules queued requests.

Scheduling (`--scheduling`):
  continuous  (default) every engine step decodes every running request and admits queued ones first come,
              first served while the batch has a free row (--max-batch-size) and token budget
              (--max-num-batched-tokens; long prompts prefill in chunks): engine/continuous.py. A request that
              finishes or whose client goes away (`Job.cancel`) frees its row at the next step.
  next-batch  the thread takes up to `max_batch_size` queued requests (right after a batch of n ends it waits up
              to `batch_wait_s` for n to be queued), runs them as one BatchRunner and steps it until every row
              has finished; requests that arrive meanwhile join the NEXT batch. Models the slot KV cache cannot
              hold (engine.continuous_blocker) are always scheduled this way.

The queue is bounded (`max_queue`): `submit` refuses a job beyond it (QueueFull; the HTTP side answers 429).
Every submitted job ends with exactly one final Event: answered, cancelled, or failed with an error.
After every step each request that produced output gets an `Event` (a snapshot, never the live request)
on its asyncio queue, via `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the engine imports torch; this module does not (serve's --help reads SCHEDULING from it)
    from finemoe.engine import Request

log = logging.getLogger("finemoe.server")
IDLE_WAKEUP_S = 0.5   # how often an idle loop wakes to run periodic saves
SCHEDULING = ("continuous", "next-batch")


class QueueFull(Exception):
    """The queue holds max_queue requests already; `retry_after_s` estimates when one will have left."""

    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"the server's queue is full ({depth} requests waiting, --max-queue): retry after "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class SchedulerMetrics:
    """What the scheduler reports; these do nothing (in-process use). server/metrics.py exports them."""

    def on_queue(self, waiting: int, running: int) -> None:
        """The queue and the running batch changed size."""

    def on_admit(self, request: Request, wait_s: float) -> None:
        """`request` left the queue for the engine after `wait_s` seconds."""

    def on_step(self, engine, running: int) -> None:
        """An engine iteration with `running` requests in the batch has finished."""

    def on_request_done(self, request: Request) -> None:
        """`request` finished in the engine (its finish_reason is set)."""

    def on_finish(self, reason: str) -> None:
        """A request ended outside the engine (cancelled while queued, failed, shutdown)."""


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
    def __init__(self, engine, metrics: SchedulerMetrics, persistence, max_batch_size: int,
                 batch_wait_s: float = 0.0, scheduling: str = "continuous", max_queue: int | None = None) -> None:
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling {scheduling!r}: use one of {', '.join(SCHEDULING)}")
        self.engine = engine
        self.metrics = metrics
        self.persistence = persistence
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        if scheduling == "continuous" and engine.continuous_blocker is not None:
            log.warning("continuous batching cannot serve this model (%s): scheduling next-batch",
                        engine.continuous_blocker)
            scheduling = "next-batch"
        self.scheduling = scheduling
        self._last_batch = (0, 0.0)   # (size, perf_counter time it ended) of the previous batch
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.running = 0
        self._recent_request_s = 1.0  # moving mean of admission-to-finish seconds (Retry-After's estimate)
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
        """Queue `job` (its request's metrics.t_submit is the queue entry time). Raises QueueFull beyond
        max_queue waiting jobs."""
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                job.done = True
                job.push(Event("", 0, "cancelled", "the server is shutting down or its engine thread has stopped"))
                return
            self._drop_cancelled()
            if self.max_queue is not None and len(self._pending) >= self.max_queue:
                raise QueueFull(len(self._pending), self._retry_after_s())
            job.request.metrics.t_submit = time.perf_counter()
            self._pending.append(job)
            self.metrics.on_queue(len(self._pending), self.running)
            self._cv.notify()

    def _retry_after_s(self) -> int:
        """Whole seconds until about one queued request will have been admitted: the queue's length times the
        mean time a request spent running lately, over the batch's rows (at least 1 s)."""
        per_request = self._recent_request_s / max(self.max_batch_size, 1)
        return max(1, round(len(self._pending) * per_request))

    def _drop_cancelled(self) -> None:
        """(holding the lock) Finish queued jobs whose clients have gone."""
        if any(j.cancelled for j in self._pending):
            for j in [j for j in self._pending if j.cancelled]:
                self._finish(j, "cancelled")
            self._pending = deque(j for j in self._pending if not j.cancelled)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running and queued requests, then close the engine (saves a persisting policy)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.scheduling == "continuous":
                self._loop_continuous()
            else:
                self._loop_next_batch()
        except Exception:
            log.exception("the engine thread stopped on an error; /health now reports unavailable")
        finally:
            with self._cv:   # from here on submit() refuses new jobs
                self._stopping = True
                self._finish_all(list(self._pending), "cancelled")
                self._pending.clear()
            self.persistence.close()

    # ---- continuous batching ------------------------------------------------------------------
    def _loop_continuous(self) -> None:
        batch = self.engine.continuous_batch()
        jobs: list[Job] = []             # admitted, not yet done
        while True:
            with self._cv:
                if not self._pending and not jobs and not self._stopping:
                    self._cv.wait(IDLE_WAKEUP_S)
                if self._stopping:
                    for j in jobs:
                        j.request.cancel()
                    break
                self._drop_cancelled()
                while self._pending and batch.has_room():
                    job = self._pending.popleft()
                    batch.admit(job.request)
                    jobs.append(job)
                    self._admitted(job)
                self.running = len(jobs)
                self.metrics.on_queue(len(self._pending), self.running)
            if not jobs:
                self._refresh_policy_state()
                self.persistence.tick()
                continue
            jobs = self._step(batch, jobs)
        self._publish_ended(jobs)

    def _step(self, batch, jobs: list[Job]) -> list[Job]:
        """One engine step of the continuous batch; publish what it produced. Returns the jobs still running.
        An engine failure fails every running job and starts a fresh batch."""
        for j in jobs:
            if j.cancelled:
                j.request.cancel()
        try:
            produced = {id(r) for r, _ in batch.step()}
        except Exception:
            log.exception("engine step failed; failing the %d running requests", len(jobs))
            batch.abort()
            for j in jobs:
                self._finish(j, "error", "the engine failed while running this request (see the server log)")
            return []
        self.metrics.on_step(self.engine, len(jobs))
        for j in jobs:
            if id(j.request) in produced or j.request.finished:
                self._publish(j)
        self.persistence.tick()
        left = [j for j in jobs if not j.done]
        self.running = len(left)
        self.metrics.on_queue(len(self._pending), self.running)
        return left

    def _publish_ended(self, jobs: list[Job]) -> None:
        for j in jobs:
            if not j.done:
                self._publish(j)

    # ---- next-batch admission -------------------------------------------------------------------
    def _loop_next_batch(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if batch:
                self._run_batch(batch)
            self._refresh_policy_state()
            self.persistence.tick()

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
            self._drop_cancelled()
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                job = self._pending.popleft()
                batch.append(job)
                self._admitted(job)
            self.running = len(batch)
            self.metrics.on_queue(len(self._pending), self.running)
            return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        from finemoe.engine.batch import BatchRunner   # imports torch: the engine thread has it loaded already

        try:
            runner = BatchRunner(self.engine, [j.request for j in jobs])
            while not runner.done:
                for j in jobs:
                    if j.cancelled or self._stopping:
                        j.request.cancel()
                produced = {id(r) for r, _ in runner.step()}
                self.metrics.on_step(self.engine, sum(not j.done for j in jobs))
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
            self.metrics.on_queue(len(self._pending), 0)
            self._last_batch = (len(jobs), time.perf_counter())

    def _admitted(self, job: Job) -> None:
        m = job.request.metrics
        m.t_admit = time.perf_counter()
        self.metrics.on_admit(job.request, m.t_admit - m.t_submit)

    def _refresh_policy_state(self) -> None:
        state = self.engine.policy.state_dict()
        self.policy_state = {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str))}

    def _publish(self, job: Job) -> None:
        r = job.request
        if r.finished:
            job.done = True
            self.metrics.on_request_done(r)
            if r.metrics.t_admit is not None:
                self._recent_request_s += 0.2 * (time.perf_counter() - r.metrics.t_admit - self._recent_request_s)
        shutdown = r.finish_reason == "cancelled" and self._stopping and not job.cancelled
        job.push(Event(r.text, len(r.output_ids), r.finish_reason, "the server is shutting down" if shutdown else None))

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        job.done = True
        self.metrics.on_finish(reason)
        job.push(Event(job.request.text, len(job.request.output_ids), reason, error))

    def _finish_all(self, jobs: list[Job], reason: str) -> None:
        for j in jobs:
            if not j.done:
                self._finish(j, reason, "the server is shutting down" if reason == "cancelled" else None)
