"""Policy variants named on the command line: `POLICY` or `POLICY/KEY=VALUE/KEY=VALUE` (JSON values).

The whole token is the variant's label, e.g. `finemoe/search=trajectory/selection=topk`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from finemoe.errors import ConfigError
from finemoe.policies import get_policy_class

# policies whose prefetch distance the bench sweeps, and the option that carries it
DISTANCE_OPTION = {"finemoe": "prefetch_distance", "promoe": "stride"}
# policies whose history is built from the build split, and the option naming its file
HISTORY_OPTION = {"finemoe": "map_store", "moe-infinity": "collection"}


@dataclass(frozen=True)
class Variant:
    label: str
    policy: str
    options: dict = field(default_factory=dict)

    @property
    def uses_distance(self) -> bool:
        return self.policy in DISTANCE_OPTION

    @property
    def needs_history(self) -> bool:
        return self.policy in HISTORY_OPTION

    @property
    def speculative(self) -> bool:
        return get_policy_class(self.policy).needs_hidden_states

    def with_distance(self, d: int | None) -> dict:
        opts = dict(self.options)
        if d is not None and self.uses_distance:
            opts.setdefault(DISTANCE_OPTION[self.policy], d)
        return opts


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(token: str) -> Variant:
    name, *items = token.strip().split("/")
    get_policy_class(name)          # unknown policy -> UnknownPolicyError naming the available ones
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"policy variant {token!r}: {item!r} is not KEY=VALUE (use POLICY/KEY=VALUE/...)")
        opts[key] = _value(value)
    return Variant(token.strip(), name, opts)


def parse_variants(text: str) -> list[Variant]:
    out = [parse_variant(t) for t in text.split(",") if t.strip()]
    if not out:
        raise ConfigError("--policies is empty: name at least one policy, e.g. --policies finemoe,lru")
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--policies names a variant twice: {labels}")
    return out
