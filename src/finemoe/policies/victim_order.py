"""A VictimOrder for policies whose victims are the occupied slots in ascending (rank(key), slot) order.

A binary heap of (rank, slot, key) entries with lazy deletion: an entry whose slot no longer holds its
key is dropped when it surfaces. Two ways to keep ranks current:
  monotone  ranks only ever grow (recency clocks, use counts): no update is pushed when a rank changes;
            an entry that surfaces with an outdated (smaller) rank is pushed back with the current one.
            Every occupied slot keeps an entry whose rank is <= its current rank, so the first entry that
            surfaces with its current rank is the smallest (rank, slot) of all occupied slots.
  eager     ranks may shrink (next-use distances): the owner calls `touched(keys)` after changing ranks,
            which pushes fresh entries; an entry whose rank is outdated is dropped when it surfaces.
Cost per victim: O(log N) heap steps in C plus a few Python operations, against an argsort over every
candidate per miss on the `select_victims` path.
"""
from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import Any, Callable

from finemoe.policies.base import VictimOrder


class HeapVictimOrder(VictimOrder):
    """`rank(key)` -> a comparable (float or tuple), read when an entry is pushed or surfaces.
    `prefetch_limit()` (optional) -> for prefetch evictions only entries with rank < limit are victims
    (a policy declining to evict what is needed sooner than the prefetch)."""

    def __init__(self, rank: Callable[[int], Any], monotone: bool,
                 prefetch_limit: Callable[[], Any] | None = None) -> None:
        self.rank, self.monotone, self.prefetch_limit = rank, monotone, prefetch_limit
        self.key_at: list[int] = []          # the cache's live [N] key per slot (-1 empty), once attached
        self.slot_of: list[int] = []         # the cache's live [L*J] slot per key (-1 absent)
        self.heap: list[tuple] = []
        self.enabled = True                  # False: the owner's ranks cannot be kept current (use select_victims)

    def attach(self, key_of: list[int], slot_of: list[int]) -> None:
        self.key_at, self.slot_of = key_of, slot_of
        self.max_entries = 4 * len(key_of) + 64
        self.rebuild()

    def rebuild(self) -> None:
        """Re-rank every occupied slot from scratch (after the owner's ranks changed wholesale)."""
        rank = self.rank
        self.heap = [(rank(k), s, k) for s, k in enumerate(self.key_at) if k >= 0]
        heapify(self.heap)

    def placed(self, slot: int, key: int, old: int) -> None:
        heappush(self.heap, (self.rank(key), slot, key))

    def touched(self, keys: list[int]) -> None:
        """Eager mode: `keys`' ranks changed; push their current entries (absent keys are skipped)."""
        if not self.key_at:
            return
        slot_of, rank, heap = self.slot_of, self.rank, self.heap
        for k in keys:
            s = slot_of[k]
            if s >= 0:
                heappush(heap, (rank(k), s, k))

    def victims(self, n: int, for_prefetch: bool, blocked: set[int]) -> list[int] | None:
        if not self.enabled:
            return None
        if len(self.heap) > self.max_entries:    # outdated entries piled up: start over
            self.rebuild()
        limit = self.prefetch_limit() if for_prefetch and self.prefetch_limit is not None else None
        heap, key_at, rank, monotone = self.heap, self.key_at, self.rank, self.monotone
        out: list[int] = []
        held: list[tuple] = []
        while n and heap:
            entry = heap[0]
            r, s, k = entry
            if key_at[s] != k:                   # evicted since: drop
                heappop(heap)
            elif (now := rank(k)) != r:          # outdated: re-rank (monotone) or drop (a fresher entry exists)
                if monotone:
                    heapreplace(heap, (now, s, k))
                else:
                    heappop(heap)
            elif limit is not None and not r < limit:
                break
            else:
                heappop(heap)
                if s in blocked:                 # not evictable now: keep its entry
                    held.append(entry)
                elif s not in out:               # (a duplicate entry of a slot already chosen is dropped)
                    out.append(s)
                    n -= 1
        for entry in held:
            heappush(heap, entry)
        return out
