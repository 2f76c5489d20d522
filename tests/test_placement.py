"""experts/placement.py: the cache's slots spread over several devices, and the non-expert weights' layers."""
import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.experts.placement import place, split_layers

GPUS = ("cuda:0", "cuda:1")


def test_slots_lie_in_contiguous_ranges_one_per_device_in_order():
    p = place(GPUS, slots_per_device=5, total_experts=40, num_experts=8, expert_bytes=10,
              layer_bytes=np.full(4, 100), shared_bytes=50)
    assert p.num_slots == 10
    assert p.slot_device.tolist() == [0] * 5 + [1] * 5
    dev, idx = p.local(np.array([0, 4, 5, 9]))
    assert dev.tolist() == [0, 0, 1, 1] and idx.tolist() == [0, 4, 0, 4]


def test_primary_computes_every_layer_on_the_first_device_which_stages_one_layer():
    p = place(GPUS, 5, 40, 8, 10, np.full(4, 100), 50)
    assert p.layer_device.tolist() == [0, 0, 0, 0]
    assert p.staging.tolist() == [5, 0]        # J = 8, but only 5 slots live elsewhere


def test_one_device_has_no_staging():
    p = place(("cpu",), 5, 40, 8, 10, np.full(4, 100), 50)
    assert p.staging.tolist() == [0] and p.num_slots == 5


def test_the_total_is_capped_at_every_expert_once_the_last_device_giving_up_first():
    p = place(GPUS, slots_per_device=30, total_experts=40, num_experts=8, expert_bytes=10,
              layer_bytes=np.full(4, 100), shared_bytes=0)
    assert [p.slots_on(0), p.slots_on(1)] == [30, 10]


def test_free_memory_bounds_each_devices_slots_after_its_weights_and_staging():
    # device 0: 1000 free - 400 layers - 50 shared - 8 staging * 10 = 470 -> 47 slots, capped at 20
    # device 1: 75 free -> 7 slots
    p = place(GPUS, 20, 100, 8, 10, np.full(4, 100), 50, free_bytes=np.array([1000, 75]))
    assert [p.slots_on(0), p.slots_on(1)] == [20, 7]


def test_a_device_that_cannot_hold_its_weights_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="cuda:0 has 300 bytes free but its non-expert weights need 450"):
        place(GPUS, 5, 40, 8, 10, np.full(4, 100), 50, free_bytes=np.array([300, 10**6]))


def test_split_gives_contiguous_balanced_layer_ranges_weighted_by_free_memory():
    assert split_layers(np.full(8, 10), np.array([1, 1])).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert split_layers(np.full(8, 10), np.array([3, 1])).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    p = place(GPUS, 5, 40, 8, 10, np.full(4, 100), 50, mode="split")
    assert p.layer_device.tolist() == [0, 0, 1, 1]
    assert p.staging.tolist() == [5, 5]        # both compute layers


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="placement 'rows' is not known"):
        place(GPUS, 5, 40, 8, 10, np.full(4, 100), 50, mode="rows")
