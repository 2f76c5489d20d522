"""Shared by the live-server tests: a started `finemoe serve` process, its openai client, and /metrics reads."""
from __future__ import annotations

import re
from contextlib import contextmanager

import httpx
import openai

from finemoe.server.process import ServerProcess


@contextmanager
def live_server(args: list[str]):
    """`finemoe serve ARGS` on a free loopback port, one torch thread (the CI machine has 2 cores)."""
    with ServerProcess(args, env={"OMP_NUM_THREADS": "1"}) as s:
        yield s


def client_for(server, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def metric(server, name: str) -> float:
    """One sample of GET /metrics, e.g. 'finemoe_requests_total{outcome="length"}'."""
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
