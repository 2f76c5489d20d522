"""experts/placement.py: the cache's slots spread over several devices, and the decoder layers' devices under the two
non-expert placements (primary: all on the first; split: contiguous ranges, as accelerate's balanced map)."""
import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.experts.placement import capped, layer_devices, place, split_layers

GPUS = ("cuda:0", "cuda:1")
FOUR_MOE_LAYERS = np.arange(4)


def test_slots_lie_in_contiguous_ranges_one_per_device_in_order():
    p = place(GPUS, slots_per_device=5, total_experts=40, num_experts=8, layer_device=np.zeros(4, np.int64),
              moe_layers=FOUR_MOE_LAYERS, mode="primary")
    assert p.num_slots == 10
    assert p.slot_device.tolist() == [0] * 5 + [1] * 5
    dev, idx = p.local(np.array([0, 4, 5, 9]))
    assert dev.tolist() == [0, 0, 1, 1] and idx.tolist() == [0, 4, 0, 4]


def test_primary_computes_every_layer_on_the_first_device_which_stages_one_layer():
    p = place(GPUS, 5, 40, 8, layer_devices("primary", 2, np.full(4, 100), 50), FOUR_MOE_LAYERS, "primary")
    assert p.layer_device.tolist() == [0, 0, 0, 0] and not p.splits_layers
    assert p.staging.tolist() == [5, 0]        # J = 8, but only 5 slots live elsewhere


def test_one_device_has_no_staging():
    p = place(("cpu",), 5, 40, 8, np.zeros(4, np.int64), FOUR_MOE_LAYERS, "primary")
    assert p.staging.tolist() == [0] and p.num_slots == 5


def test_the_total_is_capped_at_every_expert_once_the_last_device_giving_up_first():
    p = place(GPUS, slots_per_device=30, total_experts=40, num_experts=8, layer_device=np.zeros(4, np.int64),
              moe_layers=FOUR_MOE_LAYERS, mode="primary")
    assert [p.slots_on(0), p.slots_on(1)] == [30, 10]
    assert capped(np.array([20, 7]), 100).tolist() == [20, 7]


def test_each_device_may_hold_its_own_number_of_slots():
    p = place(GPUS, np.array([20, 7]), 100, 8, np.zeros(4, np.int64), FOUR_MOE_LAYERS, "primary")
    assert [p.slots_on(0), p.slots_on(1)] == [20, 7]


def test_split_gives_contiguous_balanced_layer_ranges_weighted_by_free_memory():
    assert split_layers(np.full(8, 10), np.array([1, 1])).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert split_layers(np.full(8, 10), np.array([3, 1])).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    p = place(GPUS, 5, 40, 8, layer_devices("split", 2, np.full(4, 100), 0), FOUR_MOE_LAYERS, "split")
    assert p.layer_device.tolist() == [0, 0, 1, 1] and p.splits_layers
    assert p.moe_device.tolist() == [0, 0, 1, 1]
    assert p.staging.tolist() == [5, 5]        # both compute MoE layers


def test_the_first_devices_embeddings_and_head_count_towards_its_share():
    # 8 layers of 10 bytes and 40 bytes of embeddings/head on the first device: 120 bytes, 60 each
    assert layer_devices("split", 2, np.full(8, 10), 40).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert layer_devices("split", 2, np.full(8, 10), 0, weights=np.array([1, 3])).tolist() == [0, 0] + [1] * 6


def test_moe_layers_compute_on_their_decoder_layers_device():
    # decoder layer 0 dense, MoE layers at decoder layers 1, 2, 3
    p = place(GPUS, 5, 24, 8, np.array([0, 0, 1, 1]), moe_layers=np.array([1, 2, 3]), mode="split")
    assert p.moe_device.tolist() == [0, 1, 1]


def test_a_placement_records_its_mode_even_where_split_leaves_every_layer_on_the_first_device():
    p = place(GPUS, 5, 40, 8, np.zeros(4, np.int64), FOUR_MOE_LAYERS, "split")    # e.g. a first GPU with most room
    assert p.mode == "split" and not p.splits_layers
    with pytest.raises(ValueError, match="mode 'primary' does not describe layer_device"):
        place(GPUS, 5, 40, 8, np.array([0, 0, 1, 1]), FOUR_MOE_LAYERS, "primary")


def test_one_device_is_never_split():
    assert layer_devices("split", 1, np.full(4, 100), 50).tolist() == [0, 0, 0, 0]


def test_an_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="non-expert placement 'rows' is not known"):
        layer_devices("rows", 2, np.full(4, 100), 50)
