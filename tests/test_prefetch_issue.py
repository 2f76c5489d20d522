"""The idle prefetch issue rule (experts/prefetch_issue.py): chunked prefetch copies, issued only into copy-engine time
the next demand leaves idle, never evicting an expert the policy values more than the prefetched one.

Timed cases use the simulator's TimedTransport (the engine's cache code over a simulated copy engine)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe.cli.main import main
from finemoe.errors import ConfigError
from finemoe.experts.cache import ExpertCache
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.demand_timing import NO_LOAD, demand_period, idle_seconds
from finemoe.experts.prefetch_issue import PrefetchIssue
from finemoe.experts.transport import SlotPools, SyncTransport
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies import create_policy
from finemoe.policies.base import EvictionRank, Policy, PolicyContext, Prefetch
from finemoe.policies.finemoe import FineMoEPolicy
from finemoe.simulator import CostModel, TimedTransport
from finemoe.simulator.replay import Replay
from helpers import topic_trace

J = 8
EXPERT = 4096                  # bytes per expert in the timed cases: 1 s per copy at 4096 B/s
CHUNK = 1024                   # 4 chunks of 0.25 s


def geometry(layers: int, expert_bytes: int = EXPERT) -> ExpertGeometry:
    return ExpertGeometry(layers, J, 2, expert_bytes, {"w": (4, 4)}, torch.float32)


class Valued(Policy):
    """Evicts the lowest `value` first; a prefetch under the idle rule evicts only keys valued below its own."""

    name = "test-valued"
    gate_values_keys = True

    def bind(self, ctx):
        super().bind(ctx)
        self.value = np.zeros(ctx.geometry.total_experts)

    def eviction_rank(self):
        return EvictionRank.of(self.value)


def timed_cache(policy, capacity: int, layers: int, issue: PrefetchIssue, layer_s: float = 1.2,
                inflight: int = 4) -> tuple[ExpertCache, TimedTransport]:
    g = geometry(layers)
    transport = TimedTransport(capacity, CostModel(EXPERT, float(EXPERT), layer_s))
    cache = ExpertCache(g.total_experts, J, capacity, transport, policy, inflight, issue)
    policy.bind(PolicyContext(g, cache.view(), torch.device("cpu")))
    return cache, transport


def layer(cache, transport, policy, layer_i: int, experts, prefetch_keys=(), layer_s: float = 1.2):
    """One MoE layer as the layer sequence runs it: demand, release, queue the prefetches, pump, compute."""
    e = np.array(experts, np.int64)
    policy.on_access(layer_i, e, np.ones_like(e))
    res = cache.acquire(layer_i, e)
    cache.release(res.slots)
    if len(prefetch_keys):
        keys = np.array(prefetch_keys, np.int64)
        cache.enqueue(Prefetch(keys, -np.arange(keys.size, dtype=np.float64)))
    cache.pump(layer_i)
    transport.advance(layer_s)
    return res.hit


def run_layers(issue: PrefetchIssue) -> TimedTransport:
    """12 layers, 2 demand misses each, and 4 prefetches for the next layer queued at every boundary (the next
    layer's demand is among neither): copy-bound, 1 s per copy against a 1.2 s layer."""
    policy = create_policy("lru")
    cache, transport = timed_cache(policy, capacity=96, layers=12, issue=issue)
    for i in range(12):
        layer(cache, transport, policy, i, [0, 1], [(i + 1) * J + j for j in range(4, 8)] if i < 11 else [])
    return transport


def test_a_demand_copy_waits_behind_at_most_one_prefetch_chunk_under_idle_and_behind_whole_copies_under_inflight():
    chunk_s = CHUNK / EXPERT
    idle = run_layers(PrefetchIssue("idle", CHUNK))
    inflight = run_layers(PrefetchIssue("inflight"))
    assert idle.ahead_max_s <= chunk_s
    assert inflight.ahead_max_s > 2.0                       # several whole prefetch copies ahead of a demand
    assert idle.now < inflight.now                          # and the layers finish sooner


def test_a_partly_prefetched_expert_demanded_midway_completes_as_demand_without_a_second_copy():
    policy = create_policy("lru")
    cache, transport = timed_cache(policy, capacity=8, layers=3, issue=PrefetchIssue("idle", CHUNK), layer_s=0.6)
    layer(cache, transport, policy, 0, [0], layer_s=0.6)             # demand load at 0 s, its copy stalls to 1 s
    layer(cache, transport, policy, 1, [0], [2 * J + 3], layer_s=0.6)   # load at 1.6 s: period 1.6 s, copy to 2.6 s;
    assert transport.bytes_copied == 2 * EXPERT + 2 * CHUNK          # next demand at 3.2 s: 2 chunks fit, 2 stay queued
    assert cache.state.issue[0]["partial"] >= 0
    slot = cache.slot_of[2 * J + 3]
    assert not transport.finished(np.array([slot]))[0]
    now = transport.now
    hit = layer(cache, transport, policy, 2, [3], layer_s=0.0)       # demanded with 2 chunks missing
    assert hit.tolist() == [False]
    assert transport.bytes_copied == 3 * EXPERT                      # the rest only, not a second whole copy
    assert transport.now == pytest.approx(now + 0.5) and cache.state.issue[0]["partial"] == -1   # 2 chunks
    assert cache.prefetch_copies == 1


# ---- when the next demand comes: one rule (demand_timing.demand_period, idle_seconds) for engine and simulator ------
def hit_load(transport: TimedTransport) -> None:
    """A demand load of one expert already copied (a hit: no copy, the clock stays)."""
    transport.load(np.array([0]), np.array([0]), np.zeros(1, bool))


def test_the_idle_budget_expects_the_next_demand_one_mean_period_after_the_last_load():
    transport = TimedTransport(4, CostModel(1000, 1000.0, 0.5))   # 1 s per 1000 B copy; layer time 0.5 s (unused)
    hit_load(transport)                                            # load at 0 s: no period yet, no budget
    assert transport.idle_bytes() == 0.0
    for gap in (2.0, 3.0, 10.0, 1.0):                              # loads at 2, 5, 15, 16 s
        transport.advance(gap)
        hit_load(transport)
    # period: 2 (the first gap); 2 + 0.1 * (3 - 2) = 2.1; the 10 s gap (>= 3 x 2.1, an iteration boundary) is
    # left out; 2.1 + 0.1 * (1 - 2.1) = 1.99. Next demand expected at 16 + 1.99 = 17.99 s.
    assert transport.state.times[0]["period"] == pytest.approx(1.99)
    assert transport.state.times[0]["last_load"] == 16.0
    assert transport.idle_bytes() == pytest.approx(1990.0)        # nothing queued: 1.99 s idle
    transport.copy(np.array([1]), np.array([1]))                   # a queued copy, 16 -> 17 s
    assert transport.idle_bytes() == pytest.approx(990.0)         # 17.99 - 17
    transport.advance(0.5)                                         # now 16.5 s: the next demand is still at 17.99 s
    assert transport.idle_bytes() == pytest.approx(990.0)
    transport.copy(np.array([2]), np.array([2]))                   # queued to 18 s, past the next demand
    assert transport.idle_bytes() == 0.0


def test_the_engines_functions_and_the_simulators_kernels_give_the_same_budget():
    """CudaTransport calls demand_period at each demand load and idle_seconds (x its bandwidth) for the budget, on
    the host clock; the simulator's timed kernels call the same functions on its clock: the same loads and queued
    work give the same number."""
    bandwidth, rng = 1000.0, np.random.default_rng(0)
    transport = TimedTransport(4, CostModel(1000, bandwidth, 0.5))
    last_load, period, busy_until = NO_LOAD, 0.0, 0.0              # CudaTransport's state
    for _ in range(40):
        transport.advance(float(rng.choice([0.3, 0.5, 0.9, 4.0])))
        now = transport.now
        period, last_load = demand_period(period, last_load, now), now        # CudaTransport.load
        hit_load(transport)
        if rng.random() < 0.5:                                     # a prefetch copy of 1000 B (1 s)
            busy_until = max(now, busy_until) + 1000 / bandwidth             # CudaTransport._queued
            transport.copy(np.array([1]), np.array([1]))
        transport.advance(float(rng.choice([0.0, 0.2])))
        engine = idle_seconds(last_load, period, transport.now, busy_until) * bandwidth   # CudaTransport.idle_bytes
        assert transport.idle_bytes() == pytest.approx(engine, abs=1e-9)
    assert period == transport.state.times[0]["period"] and 0.3 < period < 4.0


def test_chunked_copies_land_the_same_bytes_and_a_demand_finishes_a_partly_copied_expert():
    class Budgeted(SyncTransport):
        budget = 512.0

        def idle_bytes(self) -> float:
            return self.budget

    shapes = {"w": (8, 40), "b": (40,)}                             # 1280 + 160 B: a chunk straddles the two
    g = ExpertGeometry(2, J, 2, 1440, shapes, torch.float32)
    tensors = [{name: torch.randn(J, *s) for name, s in shapes.items()} for _ in range(2)]
    pools = SlotPools(HostExpertStore(g, tensors, pinned=False), 4, torch.device("cpu"))
    transport = Budgeted(HostExpertStore(g, tensors, pinned=False), pools)
    policy = create_policy("lru")
    cache = ExpertCache(g.total_experts, J, 4, transport, policy, 4, PrefetchIssue("idle", 256))
    policy.bind(PolicyContext(g, cache.view(), torch.device("cpu")))
    cache.enqueue(Prefetch(np.array([J + 5, J + 6]), np.array([2.0, 1.0])))
    cache.pump(0)                                                    # 2 chunks of J+5
    slot = cache.slot_of[J + 5]
    assert transport.bytes_copied == 512
    assert torch.equal(pools.tensors["w"][slot].view(-1)[:128], tensors[1]["w"][5].view(-1)[:128])
    assert not pools.tensors["w"][slot].view(-1)[128:].any()
    transport.budget = 1440.0
    cache.pump(0)                                                    # the rest of J+5, then 512 B of J+6
    assert torch.equal(pools.tensors["w"][slot], tensors[1]["w"][5])
    assert torch.equal(pools.tensors["b"][slot], tensors[1]["b"][5])
    res = cache.acquire(1, np.array([6], np.int64))                  # J+6 demanded with 2 chunks copied
    assert res.hit.tolist() == [False]
    for name in shapes:
        assert torch.equal(pools.tensors[name][res.slots[0]], tensors[1][name][6])
    assert transport.bytes_copied == 2 * 1440


class Unvalued(Valued):
    gate_values_keys = False      # its gate orders eviction only: prefetches have no per-key limit


@pytest.mark.parametrize("mode,cls", [("idle", Valued), ("inflight", Valued), ("idle", Unvalued)])
def test_under_idle_a_prefetch_never_evicts_an_expert_the_policy_values_more(mode, cls):
    policy = cls()
    cache, transport = timed_cache(policy, capacity=3, layers=2, issue=PrefetchIssue(mode, CHUNK), layer_s=10.0)
    layer(cache, transport, policy, 0, [0, 1, 2], layer_s=10.0)      # k0, k1, k2 resident
    layer(cache, transport, policy, 0, [0], layer_s=10.0)            # k0 read by the layer computing now
    policy.value[[1, 2]] = [0.5, 0.1]
    policy.value[[J + 1, J + 2]] = [0.3, 0.05]
    cache.enqueue(Prefetch(np.array([J + 1, J + 2]), np.array([2.0, 1.0])))
    cache.pump(0)
    if mode == "idle" and cls is Valued:   # J+1 (0.3) may evict k2 (0.1) only; J+2 (0.05) nothing: stays queued
        assert sorted(np.flatnonzero(cache.resident)) == [0, 1, J + 1]
        assert cache.queued == 1
    else:                     # no limit: both victims go, the lowest value first
        assert sorted(np.flatnonzero(cache.resident)) == [0, J + 1, J + 2]


def test_finemoe_prefetches_carry_their_guiding_probability_as_the_gate():
    policy = FineMoEPolicy(capacity=20, embed=torch.nn.Embedding(50, 8))
    g = geometry(2)
    cache = ExpertCache(g.total_experts, J, 4, TimedTransport(4, CostModel(EXPERT)), policy)
    policy.bind(PolicyContext(g, cache.view(), torch.device("cpu")))
    assert cache.rank.gate is policy.scores.state.p and cache.rank.limit[0] == np.inf and policy.gate_values_keys


def per_layer_only(cls: type[Policy]) -> type[Policy]:
    """`cls` without compiled decode callbacks: the simulator runs it through the per-layer (Python) path."""
    class PerLayer(cls):
        def decode_kernels(self, probs):
            return None
    return PerLayer


def test_the_compiled_decode_loop_replays_the_idle_rule_like_the_per_layer_path():
    trace, embed = topic_trace(), torch.nn.Embedding(50, 8)
    issue = PrefetchIssue("idle", 256)
    rows = []
    for cls in (FineMoEPolicy, per_layer_only(FineMoEPolicy)):
        policy = cls(capacity=20, prefetch_distance=2, embed=embed)
        replay = Replay(trace, policy, "40%", CostModel(1000, 1e6, 1e-3, 1e-4), issue=issue)
        rows.append(replay.run())
    for key in ("hits", "misses", "bytes_copied", "prefetch_copies", "wasted_prefetches", "tpot_s"):
        assert rows[0][key] == rows[1][key], key
    assert rows[0]["prefetch_copies"] > 0


def test_bad_prefetch_issue_values_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--prefetch-issue 'fast' is not one of inflight, idle, off"):
        PrefetchIssue("fast")
    for bad in (0, 1000, -256):
        with pytest.raises(ConfigError, match="multiple of 256"):
            PrefetchIssue("idle", bad)
    path = tmp_path / "t.safetensors"
    topic_trace().save(str(path))
    for flags in (["--prefetch-issue", "eager"], ["--prefetch-issue", "idle", "--copy-chunk-bytes", "300"]):
        assert main(["simulate", "--trace", str(path), "--policy", "lru", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and flags[-1] in err


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-loop", "per-layer"])
def test_off_drops_every_prefetch_and_keeps_the_policys_eviction(compiled):
    """`off`: the policy still predicts, but nothing it predicts is copied; every expert arrives by demand."""
    trace, embed = topic_trace(), torch.nn.Embedding(50, 8)
    rows = {}
    cls = FineMoEPolicy if compiled else per_layer_only(FineMoEPolicy)
    for mode in ("inflight", "off"):
        replay = Replay(trace, cls(capacity=20, prefetch_distance=2, embed=embed), "40%",
                        CostModel(1000, 1e6, 1e-3, 1e-4), issue=PrefetchIssue(mode))
        rows[mode] = replay.run()
    assert rows["inflight"]["prefetch_copies"] > 0
    assert rows["off"]["prefetch_copies"] == rows["off"]["wasted_prefetches"] == 0
    assert rows["off"]["bytes_copied"] == rows["off"]["misses"] * 1000


def test_off_in_the_engine_is_exact_and_copies_on_demand_only(tmp_path):
    from finemoe import EngineConfig
    from finemoe.engine import Engine, SamplingParams
    from helpers import save_tiny_checkpoint
    ckpt = save_tiny_checkpoint("qwen2_moe", tmp_path / "qwen2_moe")
    out = {}
    for mode in ("inflight", "off"):
        engine = Engine.from_config(EngineConfig(model=str(ckpt), device="cpu", expert_budget="50%",
                                                 policy="mixtral-offloading",
                                                 prefetch_issue=mode, show_progress=False))
        reqs = engine.generate(["Hello there", "The quick brown fox"], SamplingParams(max_new_tokens=6,
                                                                                       ignore_eos=True))
        s = engine.summary(reqs)
        out[mode] = ([r.output_ids for r in reqs], s)
    assert out["off"][0] == out["inflight"][0]
    assert out["inflight"][1]["prefetch_copies"] > 0 and out["off"][1]["prefetch_copies"] == 0
    assert out["off"][1]["wasted_prefetches"] == 0


def test_moe_infinity_gates_its_prefetches_by_the_matched_usage_share():
    """moe-infinity's value of holding a key is its usage share in the latest match: under the idle rule a prefetch
    evicts only experts the match uses less. The compiled decode loop and the per-layer path decide alike."""
    from finemoe.policies.moe_infinity import MoEInfinityPolicy
    trace = topic_trace()
    rows = []
    for cls in (MoEInfinityPolicy, per_layer_only(MoEInfinityPolicy)):
        policy = cls()
        replay = Replay(trace, policy, "40%", CostModel(1000, 1e6, 1e-3, 1e-4), issue=PrefetchIssue("idle", 256))
        rows.append(replay.run())
        assert replay.cache.rank.gate is policy.gate and policy.gate_values_keys
        assert policy.gate.max() > 0 and policy.gate.max() <= 1.0
    for key in ("hits", "misses", "bytes_copied", "prefetch_copies", "wasted_prefetches", "tpot_s"):
        assert rows[0][key] == rows[1][key], key
    assert rows[0]["prefetch_copies"] > 0
