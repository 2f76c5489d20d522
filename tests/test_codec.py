"""Packed bf16 expert weights (experts/codec.py) unpack to the same bits, whatever the values; a packed tensor moves
about 3/4 of the bytes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import require_shared
from finemoe.experts import codec
from finemoe.experts.packed_transport import compiled_unpack


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))


def test_initialised_weights_round_trip_in_three_quarters_of_the_bytes():
    w = (torch.randn(2048, 1408, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    p = codec.pack(w)
    assert same_bits(codec.unpack(p), w)
    assert 0 < p.esc_pos.numel() < 1e-3 * w.numel()                      # the tail below the window escapes
    assert p.nbytes < 0.76 * w.numel() * 2


def test_every_special_value_round_trips():
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 3e38, -3e38,
                            1.0, -1.0, 2.0 ** -133, 0.5], dtype=torch.bfloat16)
    w = torch.cat([special, (torch.randn(1001) * 0.02).to(torch.bfloat16)])
    assert same_bits(codec.unpack(codec.pack(w)), w)


def test_every_bit_pattern_round_trips():
    w = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)   # all 65,536
    p = codec.pack(w)
    assert same_bits(codec.unpack(p), w)


def test_trained_expert_weights_of_ref_moe_round_trip():
    folder = require_shared("models", "ref-moe")
    state = load_file(str(sorted(folder.glob("*.safetensors"))[0]))
    experts = [t.to(torch.bfloat16) for name, t in state.items() if ".experts." in name][:12]
    escaped = 0
    for w in experts:
        p = codec.pack(w)
        assert same_bits(codec.unpack(p), w)
        escaped += p.esc_pos.numel()
    assert escaped < 1e-3 * sum(w.numel() for w in experts)               # trained weights fit the window too


@pytest.mark.parametrize("t", [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float16)])
def test_only_even_bf16_tensors_are_packed(t):
    assert not codec.packable(t)
    with pytest.raises(ValueError, match="bf16 with an even count"):
        codec.pack(t)


def test_zeros_and_subnormals_cost_no_escape():
    w = (torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    w[::2] = 0.0                                                            # half the weights exactly zero
    w[1] = -0.0
    w[3] = 1e-40                                                            # a subnormal
    p = codec.pack(w)
    assert same_bits(codec.unpack(p), w)
    assert p.esc_pos.numel() <= 2 and p.nbytes < 0.76 * w.numel() * 2


def test_the_compiled_unpack_gives_the_same_bits():
    """What the GPU runs: codec.unpack_into under torch.compile (here its CPU build), every bit pattern."""
    w = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    p = codec.pack(w)
    out = torch.empty_like(w)
    unpack = compiled_unpack()
    unpack(p.data, torch.tensor([p.base], dtype=torch.uint8), out)
    codec.write_escapes(p.esc_pos, p.esc_val, out)
    assert same_bits(out, w)
