"""`njit`: numba's nopython compiler with the on-disk cache (numba is a dependency of finemoe)."""
from __future__ import annotations

from numba import njit as _numba_njit
from numba import typeof


def njit(fn):
    """Compile `fn` in nopython mode with an on-disk cache (first use in a fresh checkout compiles, ~1 s)."""
    return _numba_njit(cache=True)(fn)


def njit_in_memory(fn):
    """`njit` without the on-disk cache: for a kernel that takes other compiled functions as arguments, whose types
    numba keys by the function objects of the process (a disk cache would only grow)."""
    return _numba_njit(cache=False)(fn)


class FixedTypes:
    """`dispatcher` called with arguments of the same numba types at every call (the same NamedTuple state
    objects, arrays of one dtype, rank and layout, Python ints and floats): the first call compiles (or loads)
    the version for those types, and every call goes straight to its entry point, skipping numba's per-call type
    dispatch (about 2 us per NamedTuple argument, which dominates a small kernel called per layer). A call with
    other types is a caller error that numba would not catch: use it only where the argument types are fixed."""

    __slots__ = ("dispatcher", "entry")

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher
        self.entry = None

    def __call__(self, *args):
        if self.entry is None:
            self.entry = self.dispatcher.compile(tuple(typeof(a) for a in args))
        return self.entry(*args)


def njit_parallel(fn):
    """`njit` with numba's parallel loops (`prange`), for kernels over many independent rows."""
    return _numba_njit(cache=True, parallel=True)(fn)
