"""The engine: batches, the per-layer offload runtime, sampling and metrics."""
from finemoe.engine.engine import Engine, capacity_for
from finemoe.engine.request import Request
from finemoe.engine.sampling import SamplingParams

__all__ = ["Engine", "Request", "SamplingParams", "capacity_for"]
