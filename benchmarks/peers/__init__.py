"""Helpers of benchmarks/peers_gpu.py: llama.cpp (prepare, build, convert, llama-bench) and accelerate offload."""
