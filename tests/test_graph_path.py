"""The captured decode path (engine/graphs.py), run eagerly on the CPU: what a segmented CUDA graph computes and
what the host writes into its static buffers between replays, for every `--miss-compute` mode.

A CUDA graph cannot run here, but its logic can: `EagerReplay` stands where `SegmentedGraph` stands during a
capture (`runtime.capture`), and at each cut does, at once, what `SegmentedGraph.replay` does between two
replays (the previous layer's `finish_layer`, then `runtime.begin_replayed_layer`); the segment's own ops
(`runtime.captured_layer`: the whole pool window through the slot table, and in hybrid modes the keep mask and
the CPU result's add) then run eagerly, reading the static buffers just written. Those buffers persist across
decode steps, one per layer, as a captured graph's do. After every layer's host work it checks the buffers:
keep[layer] is 0 exactly at the layer's CPU experts, the CPU result is zero unless the layer has CPU experts,
and then nonzero only on tokens routed to them.

The captured path must give the eager path's decisions (hits, misses, bytes, CPU experts) and its outputs:
bit-identical in every mode here (fp32 on the CPU; a keep factor of 1 and an added 0 change nothing).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.engine.stats import LayerCut
from finemoe.experts.miss_split import MissCosts
from finemoe.models.loader import load_model
from helpers import CONFIGS, save_tiny_checkpoint

PROMPTS = ["Hello", "The quick brown fox", "a"]
BUDGET = "50%"     # the cache holds a batch-3 layer's top-k experts: a captured graph's condition (paths.py)
EVEN = MissCosts(copy_s=1.0, cpu_s=1.0)                     # auto: of n one-token misses, n // 2 to the CPU
SPLIT = MissCosts(copy_s=1.0, cpu_s=1.0, cpu_fixed_s=1.0)   # auto: none for n <= 2, about half for more


class EagerReplay:
    """The capture protocol run eagerly in replay order (see the module docstring)."""

    def __init__(self, runtime) -> None:
        self.rt = runtime
        self.results: dict[int, object] = {}    # layer -> its StaticResult, kept across steps
        self.pending = None                      # the layer step whose finish_layer comes after its segment
        self.with_cpu = self.without_cpu = self.resets = 0

    def cut(self, cut: LayerCut) -> None:
        self._finish_pending()
        kept = self.results.get(cut.layer)
        if kept is None or kept.out.shape != cut.hidden.shape:
            self.rt.allocate_static(cut)
            self.results[cut.layer] = cut.cpu_result
        else:
            cut.cpu_result = kept
        was_written = cut.cpu_result is not None and cut.cpu_result.written
        self.pending = step = self.rt.begin_replayed_layer(cut)
        if cut.cpu_result is not None:
            self._check(cut, step, was_written)

    def _check(self, cut: LayerCut, step, was_written: bool) -> None:
        cpu = step.demand.cpu
        keep = self.rt.cpu_misses.keep[cut.layer]
        want = torch.ones_like(keep)
        want[torch.from_numpy(cpu)] = 0.0
        assert torch.equal(keep, want)
        out = cut.cpu_result.out                                       # [T, H]
        if cpu.size == 0:
            assert not cut.cpu_result.written and not out.any()
            self.without_cpu += 1
            self.resets += was_written
            return
        assert cut.cpu_result.written
        routed = np.isin(step.topk, cpu).any(1)                        # [T] tokens with a CPU row
        if self.rt._live_tokens is not None:
            routed &= self.rt._live_tokens
        assert not out[torch.from_numpy(~routed)].any()
        self.with_cpu += 1

    def _finish_pending(self) -> None:
        if self.pending is not None:
            self.rt.finish_layer(self.pending)
            self.pending = None

    def step(self, forward):
        self.rt.capture = self
        try:
            out = forward()
        finally:
            self.rt.capture = None
        self._finish_pending()
        return out


class ReplayEngine(Engine):
    """Keeps every iteration's logits; with `replay` set, decode iterations take the captured path eagerly."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []
        self.replay = False
        self.emulator: EagerReplay | None = None

    def iterate(self, it, token_rows, forward):
        if self.replay and not it.is_prefill:
            if self.emulator is None or self.emulator.rt is not self.runtime:
                self.emulator = EagerReplay(self.runtime)
            out = super().iterate(it, token_rows, lambda: self.emulator.step(forward))
        else:
            out = super().iterate(it, token_rows, forward)
        self.logits.append(out.clone())
        return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen") / "qwen2_moe")


def serve(engine: ReplayEngine, mode: str, replay: bool, new_tokens: list[int], costs: MissCosts = EVEN):
    """Serve PROMPTS[:len(new_tokens)] as one batch from a cold lru cache, row i generating new_tokens[i]
    (fewer than the longest: its row goes dead in the static batch) -> (tokens, logits, totals)."""
    engine.reconfigure("lru", BUDGET, miss_compute=mode, miss_costs=costs)
    engine.logits.clear()
    engine.replay, engine.emulator = replay, None
    reqs = [engine.make_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for p, n in zip(PROMPTS, new_tokens)]
    engine.run(reqs)
    t = engine.runtime.totals
    totals = (t.hits.tolist(), t.misses.tolist(), t.bytes_copied, t.cpu_experts)
    return [r.output_ids for r in reqs], list(engine.logits), totals


def engine_for(ckpt) -> ReplayEngine:
    cfg = EngineConfig(model=str(ckpt), device="cpu", expert_budget=BUDGET, policy="lru", show_progress=False)
    return ReplayEngine(load_model(cfg), cfg)


@pytest.mark.parametrize("new_tokens,costs", [([8, 8, 8], SPLIT), ([3, 8, 5], SPLIT), ([8], EVEN)],
                         ids=["batch3", "batch3-dead-rows", "batch1"])
@pytest.mark.parametrize("mode", ["gpu", "cpu", "auto"])
def test_replayed_path_is_the_eager_path(qwen, mode, new_tokens, costs):
    engine = engine_for(qwen)
    want_tokens, want_logits, want_totals = serve(engine, mode, False, new_tokens, costs)
    tokens, logits, totals = serve(engine, mode, True, new_tokens, costs)
    assert tokens == want_tokens and totals == want_totals
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
    emu = engine.emulator
    if mode == "gpu":    # the plain segments: no static buffers at all
        assert emu.results and all(r is None for r in emu.results.values())
        return
    assert emu.with_cpu > 0
    if mode == "auto":   # layers alternate: the buffers were reset after CPU use
        assert emu.without_cpu > 0 and emu.resets > 0


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replayed_cpu_misses_match_the_device_path(arch, tmp_path):
    """Every architecture: `cpu` mode through the captured path gives gpu mode's tokens, logits within fp32
    tolerance."""
    engine = engine_for(save_tiny_checkpoint(arch, tmp_path / arch))
    want_tokens, want_logits, _ = serve(engine, "gpu", False, [5, 5, 5])
    tokens, logits, (_, misses, copied, cpu) = serve(engine, "cpu", True, [5, 5, 5])
    assert tokens == want_tokens and cpu == sum(misses) > 0 and copied == 0
    for got, want in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
