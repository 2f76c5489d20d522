"""FineMoE's copy-bound admission options (max_prefetch, cold_p): hand-computed cases. 0, 0 is the paper."""
import numpy as np
import pytest
import torch

from finemoe.errors import ConfigError
from finemoe.models.adapters import ExpertGeometry
from finemoe.policies.base import CacheView, PolicyContext
from finemoe.policies.finemoe import FineMoEPolicy
from finemoe.policies.finemoe.admission import cap
from finemoe.policies.finemoe.eviction import guided, used
from helpers import victims

L, J = 2, 4


def capped(keys, prio, resident, limit):
    keys, prio = np.array(keys, np.int64), np.array(prio, float)
    n = cap(keys, prio, keys.size, resident, limit)
    return keys[:n].tolist(), prio[:n].tolist()


def test_cap_keeps_the_most_probable_experts_that_are_not_resident_yet():
    resident = np.zeros(L * J, bool)
    resident[5] = True                                   # the likeliest expert is already there: free
    assert capped([4, 5, 6, 7], [0.2, 0.5, 0.3, 0.05], resident, 2) == ([6, 4], [0.3, 0.2])
    assert capped([4, 5, 6, 7], [0.2, 0.5, 0.3, 0.05], resident, 3) == ([4, 6, 7], [0.2, 0.3, 0.05])   # all fit


def test_cap_breaks_priority_ties_by_the_lower_key():
    resident = np.zeros(L * J, bool)
    assert capped([7, 4, 6], [0.5, 0.5, 0.1], resident, 1)[0] == [4]
    resident[J + 2] = True                               # layer 1: 1, 2, 3 tie; 2 is resident -> the lower of 1, 3
    assert capped([J + 1, J + 2, J + 3], [0.3, 0.3, 0.3], resident, 1)[0] == [J + 1]


def bound_policy(**options):
    g = ExpertGeometry(L, J, 2, 1, {}, torch.float32)
    policy = FineMoEPolicy(**options)
    policy.bind(PolicyContext(g, CacheView(np.zeros(L * J, bool), 4), torch.device("cpu"),
                              embed=torch.nn.Embedding(10, 3)))
    return policy


def test_a_prefetch_displaces_only_cold_experts_while_a_demand_miss_takes_any():
    policy = bound_policy(cold_p=0.1)
    guided(policy.scores.state, 0, np.array([0.6, 0.05, 0.3, 0.02], np.float32))   # layer 0: experts 1, 3 cold
    used(policy.scores.state, 0, np.array([0, 1, 2, 3]))                          # freq 1 each: p*freq = p
    assert victims(policy.eviction_rank(), [0, 1, 2, 3], 3, for_prefetch=True) == [3, 1]  # only 2 cold, lowest first
    assert victims(policy.eviction_rank(), [0, 1, 2, 3], 3) == [3, 1, 2]
    guided(policy.scores.state, 0, np.array([0.09, 0.2, 0.3, 0.0], np.float32))    # the latest p decides
    assert sorted(victims(policy.eviction_rank(), [0, 1, 2, 3], 4, for_prefetch=True)) == [0, 3]
    assert victims(bound_policy().eviction_rank(), [0, 1, 2, 3], 1, for_prefetch=True) == [0]     # ties -> LRU order


@pytest.mark.parametrize("bad", [{"max_prefetch": -1}, {"max_prefetch": 1.5}, {"max_prefetch": True},
                                 {"cold_p": 1.5}, {"cold_p": "x"}])
def test_bad_admission_options_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        FineMoEPolicy(**bad)
