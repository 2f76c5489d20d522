"""Routing traces: a versioned file format, a recorder for the engine, and the FLAME-MoE adapter."""
from finemoe.traces.format import FORMAT_VERSION, Trace, TraceError, load_trace

__all__ = ["FORMAT_VERSION", "Trace", "TraceError", "load_trace"]
