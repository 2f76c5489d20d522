"""Which loaded expert tensors the host store page-locks where they lie (no second copy) on CUDA: only a tensor whose
whole memory torch's CPU allocator owns and that is large enough to be its own mapping. The CUDA call itself runs on
the GPU machine (benchmarks/real_shapes_gpu.py reports how many tensors took this path)."""
from __future__ import annotations

import torch

from finemoe.experts.host_store import MMAP_THRESHOLD_MAX, pinnable_where_it_lies

BIG = MMAP_THRESHOLD_MAX // 2   # bf16 elements: exactly the threshold


def test_a_stacked_expert_tensor_is_pinned_where_it_lies():
    stacked = torch.stack([torch.zeros(BIG // 4, dtype=torch.bfloat16) for _ in range(4)])   # what the loader makes
    assert pinnable_where_it_lies(stacked)


def test_views_small_tensors_and_foreign_memory_are_copied_instead():
    t = torch.zeros(2 * BIG, dtype=torch.bfloat16)
    assert not pinnable_where_it_lies(t[BIG:])                     # starts inside its storage
    assert not pinnable_where_it_lies(t[:BIG])                     # shares its storage with the rest
    assert not pinnable_where_it_lies(t.view(2, BIG).t())          # not contiguous
    assert not pinnable_where_it_lies(torch.zeros(1024))           # small: may share pages with other allocations
    foreign = torch.frombuffer(bytearray(MMAP_THRESHOLD_MAX), dtype=torch.uint8)
    assert not pinnable_where_it_lies(foreign)                     # memory torch's allocator does not own

