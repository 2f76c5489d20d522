"""FineMoE: serve Mixture-of-Experts models from a small GPU with a fine-grained predictive expert cache.

The names below load on first use (PEP 562): `import finemoe` (e.g. for `finemoe --help`) does not import torch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Engine": "finemoe.engine", "SamplingParams": "finemoe.engine", "EngineConfig": "finemoe.config",
            "parse_budget": "finemoe.config", "FineMoEError": "finemoe.errors"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finemoe' has no attribute {name!r}")


__all__ = ["Engine", "EngineConfig", "FineMoEError", "SamplingParams", "parse_budget"]
