"""The engine: batches, the per-layer offload runtime, sampling and metrics.

The names below load on first use (PEP 562), so importing a light module of this package (metrics, for the
simulator) does not import the runtime and transformers."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Engine": "finemoe.engine.engine", "Request": "finemoe.engine.request",
            "SamplingParams": "finemoe.engine.sampling", "capacity_for": "finemoe.config"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finemoe.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
