"""FineMoE: serve Mixture-of-Experts models from a small GPU with a fine-grained predictive expert cache."""
from finemoe.config import EngineConfig, parse_budget
from finemoe.errors import FineMoEError

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Engine", "SamplingParams"):
        from finemoe import engine
        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "FineMoEError", "SamplingParams", "parse_budget"]
