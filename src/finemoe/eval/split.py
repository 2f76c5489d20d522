"""Deterministic build/held-out split of a prompt set."""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError


def split_indices(n: int, build_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`shuffled_split`'s two parts, each sorted (so requests keep their file order)."""
    build, held = shuffled_split(n, build_fraction, seed)
    return np.sort(build), np.sort(held)


def shuffled_split(n: int, build_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 with `seed`; the first round(n * build_fraction) build the history, the rest are held
    out, both in shuffled order (a prefix of either is a seeded sample). Both parts are non-empty and disjoint."""
    if not 0.0 < build_fraction < 1.0:
        raise ConfigError(f"--split {build_fraction} must be a fraction strictly between 0 and 1, e.g. 0.7")
    if n < 2:
        raise ConfigError(f"a build/held-out split needs at least 2 prompts, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_build = min(max(int(round(n * build_fraction)), 1), n - 1)
    return order[:n_build], order[n_build:]
