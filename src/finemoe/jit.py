"""`njit`: numba's compiler where numba imports, else the identity.

The compiled kernels (experts/slot_kernels.py) are plain Python over numpy arrays and scalars, so the same
source runs interpreted (much slower, same results) where numba is missing or disabled: numba's own switch
NUMBA_DISABLE_JIT=1 runs them interpreted too, which is how the tests check the two agree.
"""
from __future__ import annotations

import warnings

try:
    from numba import njit as _numba_njit
except ImportError:   # pragma: no cover - numba is a dependency; this keeps an odd platform working
    _numba_njit = None
    warnings.warn("numba cannot be imported: the expert cache's kernels run as plain Python, more than 10x slower "
                  "(results are the same); install it with `pip install numba`", RuntimeWarning, stacklevel=2)


def njit(fn):
    """Compile `fn` in nopython mode with an on-disk cache (first use in a fresh checkout compiles, ~1 s)."""
    if _numba_njit is None:
        return fn
    return _numba_njit(cache=True)(fn)


def njit_in_memory(fn):
    """`njit` without the on-disk cache: for a kernel that takes other compiled functions as arguments, whose types
    numba keys by the function objects of the process (a disk cache would only grow)."""
    if _numba_njit is None:
        return fn
    return _numba_njit(cache=False)(fn)
