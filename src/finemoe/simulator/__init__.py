"""Trace-driven simulator: replays routing traces through the engine's policies and ExpertCache with a
timed transport (copy bandwidth, per-layer compute time) to predict hits, bytes, TTFT and TPOT."""
from finemoe.simulator.replay import Replay, SimulationError, check_simulatable, simulate
from finemoe.simulator.transport import CostModel, TimedTransport

__all__ = ["CostModel", "Replay", "SimulationError", "TimedTransport", "check_simulatable", "simulate"]
