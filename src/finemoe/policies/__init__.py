"""Prefetch/eviction policies, selectable by name (`--policy NAME`) in the engine, CLI and simulator.

Importing this package registers every policy (the imports marked noqa are for their registration)."""
from __future__ import annotations

import inspect
from typing import Any

from finemoe.errors import UnknownPolicyError
from finemoe.policies.base import (CacheView, IterationInfo, LayerRouting, Policy, PolicyContext, Prefetch,
                                   RequestInfo, register_policy, registry)
from finemoe.policies import lru, resident  # noqa: F401  (registration)
from finemoe.policies import finemoe  # noqa: F401  (registration)
from finemoe.policies import deepspeed, lfu, moe_infinity, oracle  # noqa: F401  (registration)
from finemoe.policies import mixtral_offloading, promoe  # noqa: F401  (registration)
from finemoe.traces import recorder  # noqa: F401  (registration: the `record` wrapper used by `finemoe trace`)


def available() -> list[str]:
    """The policies a user may pick (internal ones, such as the trace recorder, left out)."""
    return sorted(name for name, cls in registry().items() if not cls.internal)


def get_policy_class(name: str) -> type[Policy]:
    reg = registry()
    if name not in reg:
        raise UnknownPolicyError(f"unknown policy {name!r}; available policies: {', '.join(available())}")
    return reg[name]


def option_names(name: str) -> list[str]:
    """The options policy `name` takes (its constructor's named parameters)."""
    params = inspect.signature(get_policy_class(name)).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def check_option_names(name: str, options: dict[str, Any]) -> None:
    """A one-line UnknownPolicyError naming the valid options when `options` has a key policy `name` does not take
    (checked before any model loads: EngineConfig)."""
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownPolicyError(f"policy {name!r}: bad options {unknown}: not options of this policy; valid "
                                 f"options: {', '.join(valid) if valid else 'none (drop --policy-option)'}")


def create_policy(name: str, **options: Any) -> Policy:
    cls = get_policy_class(name)
    check_option_names(name, options)
    try:
        return cls(**options)
    except TypeError as e:
        raise UnknownPolicyError(f"policy {name!r}: bad options {sorted(options)}: {e}") from None


__all__ = ["CacheView", "IterationInfo", "LayerRouting", "Policy", "PolicyContext", "Prefetch", "RequestInfo",
           "available", "check_option_names", "create_policy", "get_policy_class", "option_names", "register_policy"]
