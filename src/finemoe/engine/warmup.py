"""One-time warm-up before an engine serves or is timed (EngineConfig.warm_up).

A short request runs through the model under a stand-in policy (lru: nothing learned, nothing persisted) before
the configured policy is built, so the first-use costs (CUDA and cuBLAS initialisation, kernel loading, compiled
kernels, the allocator's first blocks) are paid outside every request's TTFT and the configured policy never sees
the warm-up request. Its seconds are reported apart (`Engine.warm_up_s`, the summary's `warm_up_s`). The configured
policy's CUDA graphs are captured at its own first decode step (after the TTFT).
"""
from __future__ import annotations

import time

import torch

from finemoe.config import EngineConfig
from finemoe.engine.sampling import SamplingParams
from finemoe.policies import get_policy_class

STAND_IN_POLICY = "lru"
WARM_UP_TEXT = "Hello, world"
WARM_UP_NEW_TOKENS = 2          # a prefill and one decode step


def stand_in(cfg: EngineConfig) -> tuple[str, str | int | float | None]:
    """(policy, expert budget) the warm-up runs under: lru with the configured budget, or with every expert when
    the configured policy keeps them all resident (the same device memory)."""
    all_resident = get_policy_class(cfg.policy).keeps_all_resident
    return STAND_IN_POLICY, None if all_resident else cfg.expert_budget


def warm_up_ids(engine) -> list[int]:
    """The warm-up request's prompt: WARM_UP_TEXT's token ids (the pad token where the tokenizer gives none)."""
    return engine.tokenizer(WARM_UP_TEXT, add_special_tokens=False)["input_ids"] or [engine.pad_id]


def warm_up(engine) -> float:
    """Run the warm-up request on `engine` (configured with the stand-in) -> seconds it took, device work included
    (HOST SYNC on CUDA)."""
    t0 = time.perf_counter()
    engine.generate([warm_up_ids(engine)], SamplingParams(max_new_tokens=WARM_UP_NEW_TOKENS, ignore_eos=True))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - t0
