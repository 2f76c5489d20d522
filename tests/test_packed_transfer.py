"""`--expert-transfer packed`: experts held packed in host memory (experts/packed_store.py) and unpacked into their
slots (experts/packed_transport.py) give the same logits, bit for bit, as plain copies, for every policy kind and
prefetch issue rule (whole copies and chunked ranges), in 3/4 of the bytes; what it cannot serve is refused in one
line."""
from __future__ import annotations

import pytest
import torch

from finemoe import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.experts.host_store import HostExpertStore
from finemoe.experts.packed_store import PackedStore
from finemoe.experts.packed_transport import PackedSyncTransport
from finemoe.experts.transport import SlotPools
from finemoe.models.adapters import ExpertGeometry
from finemoe.models.loader import load_model
from helpers import LogitsEngine, save_tiny_checkpoint

PROMPTS = ["Hello there", "The quick brown fox", "a"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen") / "qwen2_moe")


def serve(qwen, transfer: str, policy: str, issue: str):
    budget = "100%" if policy == "resident" else "25%"
    cfg = EngineConfig(model=str(qwen), device="cpu", dtype="bfloat16", expert_budget=budget, policy=policy,
                       prefetch_issue=issue, copy_chunk_bytes=256, expert_transfer=transfer, show_progress=False)
    engine = LogitsEngine(load_model(cfg), cfg)
    reqs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True))
    return engine, [r.output_ids for r in reqs]


@pytest.mark.parametrize("policy,issue", [("lru", "inflight"), ("finemoe", "inflight"), ("finemoe", "idle"),
                                          ("moe-infinity", "idle"), ("resident", "inflight")])
def test_packed_copies_give_the_plain_logits_bit_for_bit(qwen, policy, issue):
    plain, want = serve(qwen, "plain", policy, issue)
    packed, got = serve(qwen, "packed", policy, issue)
    assert isinstance(packed.store, PackedStore)
    assert got == want
    assert len(packed.logits) == len(plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(packed.logits, plain.logits))
    if policy != "resident":
        t_plain, t_packed = plain.runtime.totals, packed.runtime.totals
        assert (t_packed.hits.tolist(), t_packed.misses.tolist()) == (t_plain.hits.tolist(), t_plain.misses.tolist())
        assert t_packed.bytes_copied < 0.8 * t_plain.bytes_copied       # 12 bits a weight, plus escapes
    assert packed.store.nbytes < 0.8 * plain.store.nbytes                 # and 3/4 of the host memory


def test_what_packed_cannot_serve_is_refused_in_one_line(qwen):
    with pytest.raises(ConfigError, match="--miss-compute gpu"):
        EngineConfig(model=str(qwen), device="cpu", expert_transfer="packed", miss_compute="auto")
    with pytest.raises(ConfigError, match="not known"):
        EngineConfig(model=str(qwen), device="cpu", expert_transfer="zip")
    cfg = EngineConfig(model=str(qwen), device="cpu", dtype="float32", expert_transfer="packed", show_progress=False)
    with pytest.raises(ConfigError, match="needs bf16 experts"):
        Engine(load_model(cfg), cfg)


def test_every_expert_lands_in_its_slot_bit_for_bit_outliers_included():
    """Each tensor of each expert holds weights outside its exponent window (escapes), zeros and subnormals; a packed
    copy into a slot gives the plain weights."""
    gen = torch.Generator().manual_seed(0)
    L, J, shapes = 2, 3, {"gate_up_proj": (64, 48), "down_proj": (48, 32)}
    plain = []
    for _ in range(L):
        layer = {}
        for name, shape in shapes.items():
            w = (torch.randn((J, *shape), generator=gen) * 0.02).to(torch.bfloat16)
            w[:, 0, 0], w[:, 0, 1], w[:, 1, 0], w[:, 1, 1] = 3e4, -1e-30, 0.0, 1e-40   # outliers, zero, subnormal
            layer[name] = w
        plain.append(layer)
    geometry = ExpertGeometry(L, J, 1, 2 * (64 * 48 + 48 * 32), shapes, torch.bfloat16)
    store = PackedStore.pack(HostExpertStore(geometry, [{n: t.clone() for n, t in layer.items()} for layer in plain],
                                             pinned=False))
    assert (store.esc_counts >= 2).all()                                  # two escapes in every tensor of every expert
    pools = SlotPools(store, L * J, torch.device("cpu"))
    transport = PackedSyncTransport(store, pools)
    for key in range(L * J):
        transport.start_copy(key, key)
    for key in range(L * J):
        layer, expert = divmod(key, J)
        for name in shapes:
            got, want = pools.tensors[name][key], plain[layer][name][expert]
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (layer, expert, name)
