"""Shared test fixtures: the location of the project's shared data and models (../shared).

Tests that need ../shared skip when it is absent on a developer machine, and FAIL when the CI
environment variable is set (CI must have the data; a silent skip there would hide a broken setup).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ on sys.path, as when the script runs, for its own imports)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test model is tiny: one CPU thread is 2-3x faster than several (no thread wake-ups per op),
    and CI has only 2 cores shared by the whole run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require_shared(*parts: str) -> Path:
    """Path under ../shared, or skip (developer machine) / fail (CI) when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (shared data/models live next to the repository, in ../shared)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ref_moe_dir() -> Path:
    """The trained reference Qwen2-MoE (12 layers, 60 experts, top-4, learned routing)."""
    return require_shared("models", "ref-moe", "config.json").parent


@pytest.fixture(scope="session")
def arena_hard_prompts() -> Path:
    return require_shared("data", "prompts", "arena_hard_v01.jsonl")
