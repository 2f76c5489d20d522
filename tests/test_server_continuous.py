"""A live `finemoe serve` with continuous batching (the default) and a bounded queue, through the real openai
client on loopback: a request that arrives while another decodes gets its answer before that one finishes; a
full queue answers 429 with Retry-After in OpenAI's error format and the server stays healthy; a client that
goes away frees its row for the queued request; nothing is lost."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from finemoe.models.default import DEFAULT_MODEL_NAME
from server_helpers import client_for, live_server, metric

MODEL = DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def server():
    args = ["--device", "cpu", "--expert-budget", "25%", "--max-batch-size", "2", "--max-queue", "1",
            "--max-num-batched-tokens", "8", "--log-level", "warning"]
    with live_server(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return client_for(server, timeout=120)


def long_stream(client, prompt: str):
    """A streaming completion that would decode for minutes; returns it after its first 3 chunks arrived."""
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    return stream, chunks


def wait_for(server, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def outcome(server, name: str) -> float:
    return metric(server, f'finemoe_requests_total{{outcome="{name}"}}')


def test_a_request_arriving_mid_decode_is_answered_before_the_running_one_ends(server, client):
    stream, chunks = long_stream(client, "a long story")
    prompt = "a newcomer whose prompt is long enough to be prefilled in several chunks of eight tokens"
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    assert next(chunks).choices[0].finish_reason is None      # the first request is still decoding
    stream.close()
    wait_for(server, "finemoe_running_requests", 0)


def test_a_full_queue_answers_429_and_a_cancelled_stream_frees_its_row(server, client):
    cancelled = outcome(server, "cancelled")
    waits = metric(server, "finemoe_queue_wait_seconds_count")
    a, _ = long_stream(client, "first")
    b, _ = long_stream(client, "second")
    wait_for(server, "finemoe_running_requests", 2)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.completions.create, model=MODEL, prompt="queued", max_tokens=3, temperature=0,
                             extra_body={"ignore_eos": True})
        wait_for(server, "finemoe_queue_depth", 1)
        refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "one too many",
                                                                   "max_tokens": 3})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "--max-queue" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="refused too", max_tokens=3)
        a.close()                      # its row goes to the queued request
        assert queued.result(timeout=60).choices[0].finish_reason == "length"
    b.close()
    wait_for(server, "finemoe_running_requests", 0)
    deadline = time.monotonic() + 10
    while outcome(server, "cancelled") < cancelled + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome(server, "cancelled") == cancelled + 2
    assert metric(server, "finemoe_queue_wait_seconds_count") == waits + 3
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0 and health["max_queue"] == 1


def test_next_batch_scheduling_is_kept_as_an_option():
    with live_server(["--device", "cpu", "--scheduling", "next-batch", "--log-level", "warning"]) as s:
        health = httpx.get(s.url + "/health").json()
        assert health["scheduling"] == "next-batch" and "NEXT batch" in health["batching"]
        out = client_for(s, 60).completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0,
                                                   extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
