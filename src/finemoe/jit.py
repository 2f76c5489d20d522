"""`njit`: numba's nopython compiler with the on-disk cache (numba is a dependency of finemoe)."""
from __future__ import annotations

from numba import njit as _numba_njit


def njit(fn):
    """Compile `fn` in nopython mode with an on-disk cache (first use in a fresh checkout compiles, ~1 s)."""
    return _numba_njit(cache=True)(fn)


def njit_in_memory(fn):
    """`njit` without the on-disk cache: for a kernel that takes other compiled functions as arguments, whose types
    numba keys by the function objects of the process (a disk cache would only grow)."""
    return _numba_njit(cache=False)(fn)
