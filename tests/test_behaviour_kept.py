"""Restructuring keeps behaviour: every policy's hits, misses, bytes and simulated times on fixed traces and
budgets (simulator, batch 1), and every request's tokens, hits, misses and bytes in the CPU engine (batch 1
and 3), equal the numbers recorded in tests/golden/behaviour.json (tests/behaviour.py says how)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import behaviour
from conftest import require_shared

GOLDEN = json.loads((Path(__file__).parent / "golden" / "behaviour.json").read_text())


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@pytest.fixture(scope="module")
def simulated():
    require_shared("data", "traces", "flame_moe_290m.npz")
    return behaviour.simulator_rows()


@pytest.mark.parametrize("key", sorted(k for k in GOLDEN if k.startswith("sim/")))
def test_simulator_replays_as_recorded(simulated, key):
    assert same(simulated[key], GOLDEN[key]), (key, simulated[key], GOLDEN[key])


@pytest.fixture(scope="module")
def served():
    return behaviour.engine_rows()


@pytest.mark.parametrize("key", sorted(k for k in GOLDEN if k.startswith("engine/")))
def test_engine_serves_as_recorded(served, key):
    assert same(served[key], GOLDEN[key]), (key, served[key], GOLDEN[key])
