"""The name under which a transformers model takes and returns its KV cache, decided once per model class.

Newer transformers (5.2x) call it `cache` and deprecate `past_key_values` (a FutureWarning on every call,
removed in 5.40); older 5.x releases (5.17 on the GPU machine) know only `past_key_values`. The model's own
`forward` signature says which one it takes, so both work without a version table.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _name(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """{name: cache}, for `model(..., **cache_kwargs(model, cache))`."""
    return {_name(type(model)): cache}


def returned_cache(model: nn.Module, out):
    """The KV cache in `model`'s output `out` (the one it filled, or created when it was given None)."""
    return getattr(out, _name(type(model)))
