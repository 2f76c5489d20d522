"""Concurrent clients against a live `finemoe serve`: 16 streams batched together all get their complete,
correct greedy text; a client that disconnects mid-stream is cancelled and does not stall anyone.

Batching today: up to --max-batch-size queued requests form a batch; later arrivals join the next batch.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from finemoe.models.default import DEFAULT_MODEL_NAME
from server_helpers import client_for, live_server, metric

MODEL = DEFAULT_MODEL_NAME
PROMPTS = [f"Request {i}: {'ab' * (i % 5)}?" for i in range(16)]   # different lengths: batches are left-padded


@pytest.fixture(scope="module")
def server():
    args = ["--device", "cpu", "--expert-budget", "25%", "--max-batch-size", "8",
            "--log-level", "warning"]
    with live_server(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return client_for(server, timeout=120)


def outcome(server, name: str) -> float:
    return metric(server, f'finemoe_requests_total{{outcome="{name}"}}')


def streamed_text(client, prompt: str, max_tokens: int) -> tuple[str, str]:
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_sixteen_concurrent_streams_all_finish_with_their_greedy_text(client):
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: streamed_text(client, p, 6), PROMPTS))
    assert [text for text, _ in results] == expected
    assert all(reason == "length" for _, reason in results)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    cancelled_before = outcome(server, "cancelled")
    # Without cancellation this request would decode for minutes (~30 ms a step) and hold its batch.
    long = client.completions.create(model=MODEL, prompt="never-ending", max_tokens=3000, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
    chunks = iter(long)
    first = [next(chunks) for _ in range(3)]
    assert len(first) == 3
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(streamed_text, client, f"neighbour {i}", 5) for i in range(3)]
        long.close()   # the client goes away mid-stream
        results = [f.result(timeout=60) for f in others]
    assert all(reason == "length" for _, reason in results)
    after = client.completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason in ("length", "stop")
    assert time.monotonic() - t0 < 30, "the disconnected request kept its batch busy"
    deadline = time.monotonic() + 5
    while outcome(server, "cancelled") < cancelled_before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert outcome(server, "cancelled") == cancelled_before + 1
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queue_depth"] == 0
