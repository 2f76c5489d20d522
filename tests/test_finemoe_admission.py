"""FineMoE's copy-bound admission options (max_prefetch, cold_p): hand-computed cases. 0, 0 is the paper."""
import numpy as np
import pytest
import torch

from finemoe.errors import ConfigError
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies.base import CacheView, PolicyContext, Prefetch
from finemoe.policies.finemoe import FineMoEPolicy
from finemoe.policies.finemoe.admission import PrefetchGate
from finemoe.policies.finemoe.selection import plan_layers

L, J = 2, 4


def prefetch(keys, prio):
    return Prefetch(np.array(keys, np.int64), np.array(prio, float))


def test_cap_keeps_the_most_probable_experts_that_are_not_resident_yet():
    resident = np.zeros(L * J, bool)
    resident[5] = True                                   # the likeliest expert is already there: free
    out = PrefetchGate(max_per_layer=2).limit(prefetch([4, 5, 6, 7], [0.2, 0.5, 0.3, 0.05]), resident)
    assert out.keys.tolist() == [6, 4] and out.priority.tolist() == [0.3, 0.2]


def test_cap_breaks_priority_ties_by_the_lower_key_and_zero_means_no_cap():
    resident = np.zeros(L * J, bool)
    pf = prefetch([7, 4, 6], [0.5, 0.5, 0.1])
    assert PrefetchGate(max_per_layer=1).limit(pf, resident).keys.tolist() == [4]
    assert PrefetchGate().limit(pf, resident) is pf


def test_cold_slots_are_those_guided_below_the_threshold():
    p = np.array([0.01, 0.2, 0.0, 0.049, 0.05, 0.9, 0.0, 0.0])
    cands = np.array([0, 1, 2, 3, 4, 5])
    assert PrefetchGate(cold_p=0.05).displaceable(cands, p).tolist() == [0, 2, 3]
    assert PrefetchGate().displaceable(cands, p).tolist() == cands.tolist()


def bound_policy(**options):
    g = ExpertGeometry(L, J, 2, 1, {}, torch.float32)
    policy = FineMoEPolicy(**options)
    policy.bind(PolicyContext(g, CacheView(np.zeros(L * J, bool), 4), torch.device("cpu"),
                              embed=torch.nn.Embedding(10, 3)))
    return policy


def test_a_prefetch_displaces_only_cold_experts_while_a_demand_miss_takes_any():
    policy = bound_policy(cold_p=0.1)
    policy.scores.guide(0, np.array([0.6, 0.05, 0.3, 0.02]))     # layer 0: experts 1 and 3 are cold
    policy.scores.used(np.array([0, 1, 2, 3]))                    # freq 1 each: p*freq = p
    cands = np.array([0, 1, 2, 3])
    assert policy.select_victims(cands, 3, for_prefetch=True).tolist() == [3, 1]     # only 2 cold, lowest first
    assert policy.select_victims(cands, 3, for_prefetch=False).tolist() == [3, 1, 2]
    assert bound_policy().select_victims(cands, 1, for_prefetch=True).tolist() == [0]  # ties -> LRU order


def test_the_policy_caps_each_callback_against_live_residency():
    policy = bound_policy(max_prefetch=1)
    policy.ctx.cache.resident[J + 2] = True
    rows = np.array([[[0.1, 0.2, 0.6, 0.1]], [[0.1, 0.3, 0.3, 0.3]]])     # guides of layers 0 and 1
    plans = plan_layers([0, 1], rows, np.array([[0.0], [0.0]]), top_k=2, delta=True)   # delta 1: all chosen
    out = policy._to_prefetch(plans, layer_now=-1)
    # priorities p/(layer + 1): layer 0's expert 2 = 0.6 beats layer 1's best absent one (0.3 / 2)
    assert out.keys.tolist() == [2] and out.priority.tolist() == pytest.approx([0.6])
    out = policy._to_prefetch(plans[1:], layer_now=0)
    # layer 1: experts 1, 2, 3 tie at 0.3; 2 is resident -> the lower of 1 and 3
    assert out.keys.tolist() == [J + 1] and out.priority.tolist() == pytest.approx([0.3])


@pytest.mark.parametrize("bad", [{"max_prefetch": -1}, {"max_prefetch": 1.5}, {"max_prefetch": True},
                                 {"cold_p": 1.5}, {"cold_p": "x"}])
def test_bad_admission_options_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        FineMoEPolicy(**bad)
