"""Experiment 6's queue: one server, first come first served, on hand-made numbers."""
from __future__ import annotations

import numpy as np
import pytest

from finemoe.eval.online import fcfs_queue, scale_to_load


def test_fcfs_queue_waits_for_the_server():
    arrivals = np.array([0.0, 1.0, 1.5, 10.0])
    service = np.array([2.0, 1.0, 1.0, 1.0])
    first = np.array([0.5, 0.1, 0.1, 0.1])
    q = fcfs_queue(arrivals, service, first)
    assert q["wait_s"].tolist() == [0.0, 1.0, 1.5, 0.0]          # r1 starts at 2, r2 at 3, r3 finds it idle
    assert q["latency_s"].tolist() == [2.0, 2.0, 2.5, 1.0]
    assert q["ttft_s"].tolist() == pytest.approx([0.5, 1.1, 1.6, 0.1])


def test_scale_to_load_sets_the_mean_gap():
    arrivals = np.array([0.0, 1.0, 3.0, 4.0])                     # mean gap 4/3
    scaled = scale_to_load(arrivals, mean_service_s=2.0, utilization=0.5)
    assert np.diff(scaled).mean() == pytest.approx(4.0)           # service / utilization
    assert scaled[2] / scaled[3] == pytest.approx(0.75)           # shape kept
