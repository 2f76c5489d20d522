"""Saving what a learning policy has learned while the server runs.

The hook is the Policy interface's own: `save()` writes learned state atomically (temporary file +
rename, so a crash never leaves a torn file) and returns whether it wrote (finemoe with a map store,
moe-infinity with a collection); `close()` saves at shutdown. Both are called from the scheduler thread, between engine
iterations, so the policy's state is never read while a forward pass changes it.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("finemoe.server")


class PolicyPersistence:
    def __init__(self, engine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._last = time.monotonic()
        self.saves = 0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def tick(self) -> None:
        """Save if the interval has passed (scheduler thread, between iterations)."""
        now = time.monotonic()
        if not self.enabled or now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.saves += int(self.engine.policy.save())
        except Exception:  # a failed periodic save must not stop serving; the final save retries
            log.exception("periodic save of policy %r failed", self.engine.cfg.policy)

    def close(self) -> None:
        """Shutdown: close the engine, which closes the policy (persisting policies save there)."""
        self.engine.close()
        log.info("policy %r closed (state saved if it persists)", self.engine.cfg.policy)
