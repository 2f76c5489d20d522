"""How the cache issues prefetch copies (`--prefetch-issue`, `--copy-chunk-bytes`).

  inflight  (default) at each layer boundary, whole-expert prefetch copies while fewer than `prefetch_inflight`
            are in flight. A demand copy queues behind up to that many whole copies (one CUDA copy stream is FIFO).
  idle      prefetches never delay a demand copy:
            (a) a prefetch copy goes in chunks of `chunk_bytes` (an expert's bytes, its tensors in order, piece by
                piece); its slot is usable once every chunk has landed; a demand for an expert whose prefetch is
                partly copied issues the remaining chunks at once, as demand, ahead of every later copy;
            (b) at each layer boundary the cache issues only the chunks that fit the copy engine's predicted idle
                time before the next layer's demand (Transport.idle_bytes; the rule below); the rest stay queued on
                the host and go at a later boundary. A demand copy therefore waits behind at most the chunk in
                flight when the prediction errs, never behind queued whole prefetches;
            (c) no pollution: for a policy whose rank gate is its value of holding a key (Policy.gate_values_keys:
                finemoe, whose gate is each expert's latest guiding probability p, and oracle, minus the next use),
                a prefetch of key k evicts only victims whose gate is below gate[k]: a prefetch with probability of
                use p evicts only experts with p' < p. Other policies' prefetches keep their rank's limit only;
            (d) an expert computed on the host CPU (--miss-compute cpu|auto) is copied afterwards for reuse: queued at
                the next iteration's start below every policy prefetch (slot_kernels.CPU_COPY_PRIORITY), so it takes
                only the idle time the policy's prefetches leave, under (c)'s victim rules. (Not under inflight,
                where such copies would delay demand copies.)
  off       no prefetch copies: the policy still predicts (its host work and eviction rank are unchanged) but its
            prefetches, and the prefill lookahead's, are dropped. Every expert arrives by a demand copy: the baseline
            that shows what a policy's prefetching is worth.
When the next demand comes is one rule for the engine and the simulator (experts/demand_timing.py).
The chunk size trades copy throughput (small copies run below the link's rate) against how long a demand may wait
behind the chunk in flight: benchmarks/copy_chunks.py measures both.
"""
from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import ConfigError

ISSUE_MODES = ("inflight", "idle", "off")
CHUNK_ALIGN = 256          # chunk boundaries stay on element (and DMA-friendly) boundaries
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class PrefetchIssue:
    mode: str = "inflight"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.mode not in ISSUE_MODES:
            raise ConfigError(f"--prefetch-issue {self.mode!r} is not one of {', '.join(ISSUE_MODES)}")
        if (isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1
                or self.chunk_bytes % CHUNK_ALIGN):
            raise ConfigError(f"--copy-chunk-bytes {self.chunk_bytes!r} must be a positive multiple of {CHUNK_ALIGN}")

    @property
    def idle(self) -> bool:
        return self.mode == "idle"

    @property
    def off(self) -> bool:
        return self.mode == "off"


INFLIGHT = PrefetchIssue()    # the default rule
