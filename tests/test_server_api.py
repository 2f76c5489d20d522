"""`finemoe serve` as a live process, spoken to by the real `openai` client: completions, chat,
streaming, stop strings, seeds, /v1/models, /health and /metrics moving with traffic.

One server (built-in default model, CPU, 25% expert budget) serves the whole module. It runs with one
intra-op thread: it shares CI's two cores with this process's client threads.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from finemoe.models.default import DEFAULT_MODEL_NAME, default_tokenizer
from server_helpers import client_for, live_server, metric

SERVER_ARGS = ["--device", "cpu", "--expert-budget", "25%", "--max-batch-size", "8", "--max-model-len", "256",
               "--log-level", "warning"]
MODEL = DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def server():
    with live_server(SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return client_for(server, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch_size"] == 8
    assert health["scheduling"] == "continuous" and "every engine step" in health["batching"]
    assert health["warm_up_s"] > 0           # warmed up before accepting requests, reported apart from any TTFT


def test_completion_counts_tokens_and_stops_at_max_tokens(client):
    out = client.completions.create(model=MODEL, prompt="The expert cache", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(default_tokenizer()("The expert cache", add_special_tokens=False).input_ids)
    assert out.usage.completion_tokens == 6 and out.usage.total_tokens == out.usage.prompt_tokens + 6
    again = client.completions.create(model=MODEL, prompt="The expert cache", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_chat_completion_uses_the_chat_template(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    tok = default_tokenizer()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False).input_ids)
    assert 1 <= out.usage.completion_tokens <= 5 or out.choices[0].finish_reason == "stop"


def test_streamed_completion_reassembles_to_the_greedy_text(client):
    kw = dict(model=MODEL, prompt="Offloading experts", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streamed_chat_reassembles_and_reports_usage(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Stream me"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_text_streamed_or_not(client):
    kw = dict(model=MODEL, prompt="The", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    windows = [i for i in range(1, len(full) - 1) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2]]
    assert windows, f"the greedy text {full!r} has no printable pair to use as a stop string"
    stop = full[windows[-1]:windows[-1] + 2]   # the last pair: streaming must hold back partial matches
    expected = full[:full.find(stop)]
    cut = client.completions.create(stop=[stop], **kw)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == expected


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="Sample", max_tokens=8, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    first = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == first


def test_metrics_move_with_traffic(server, client):
    names = ['finemoe_requests_total{outcome="length"}', "finemoe_time_to_first_token_seconds_count",
             "finemoe_time_per_output_token_seconds_count", "finemoe_generation_tokens_total",
             "finemoe_expert_hits_total", "finemoe_expert_misses_total", "finemoe_prompt_tokens_total"]
    before = {n: metric(server, n) for n in names}
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    after = {n: metric(server, n) for n in names}
    assert after[names[0]] == before[names[0]] + 1
    assert after[names[1]] == before[names[1]] + 1 and after[names[2]] == before[names[2]] + 1
    assert after["finemoe_generation_tokens_total"] == before["finemoe_generation_tokens_total"] + 4
    assert after["finemoe_prompt_tokens_total"] == before["finemoe_prompt_tokens_total"] + 8
    seen = after["finemoe_expert_hits_total"] + after["finemoe_expert_misses_total"]
    assert seen > before["finemoe_expert_hits_total"] + before["finemoe_expert_misses_total"]
    assert 0 < metric(server, "finemoe_expert_cache_occupancy_ratio") <= 1
    assert metric(server, "finemoe_queue_depth") == 0 and metric(server, "finemoe_running_requests") == 0


# ---- bad input: (what, request body or raw bytes, status, error type, param or code) -----------------
BAD = [
    ("invalid JSON", b'{"model": ', 400, "invalid_request_error", None),
    ("not an object", [1, 2], 400, "invalid_request_error", None),
    ("missing prompt", {"model": MODEL}, 400, "invalid_request_error", "prompt"),
    ("missing model", {"prompt": "x"}, 400, "invalid_request_error", "model"),
    ("max_tokens wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "8"}, 400, "invalid_request_error",
     "max_tokens"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("max_tokens zero", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("max_tokens negative", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "invalid_request_error",
     "max_tokens"),
    ("max_tokens over the limit", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400, "invalid_request_error",
     "context_length_exceeded"),
    ("prompt over max-model-len", {"model": MODEL, "prompt": "y" * 300}, 400, "invalid_request_error",
     "context_length_exceeded"),
    ("unknown model", {"model": "gpt-4o", "prompt": "x"}, 404, "invalid_request_error", "model_not_found"),
    ("n > 1", {"model": MODEL, "prompt": "x", "n": 2}, 400, "invalid_request_error", "n"),
    ("best_of", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "invalid_request_error", "best_of"),
    ("logprobs", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "invalid_request_error", "logprobs"),
    ("unknown argument", {"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "invalid_request_error",
     "frobnicate"),
    ("temperature out of range", {"model": MODEL, "prompt": "x", "temperature": 5}, 400, "invalid_request_error",
     "temperature"),
    ("token id out of vocabulary", {"model": MODEL, "prompt": [1, 99999]}, 400, "invalid_request_error", "prompt"),
]
BAD_CHAT = [
    ("empty messages", {"model": MODEL, "messages": []}, 400, "invalid_request_error", "messages"),
    ("messages wrong type", {"model": MODEL, "messages": "hi"}, 400, "invalid_request_error", "messages"),
    ("tools", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "invalid_request_error", "tools"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "invalid_request_error", "messages.0.role"),
]


@pytest.mark.parametrize("path,case", [("/v1/completions", c) for c in BAD] + [("/v1/chat/completions", c)
                                                                                for c in BAD_CHAT],
                         ids=[c[0] for c in BAD + BAD_CHAT])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, path, case):
    _, body, status, kind, param_or_code = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == kind
    assert param_or_code in (None, err["param"], err["code"]) and err["message"]
    assert "Traceback" not in r.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_errors_reach_the_openai_client_and_serving_continues(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert "messages" in str(info.value)
    assert httpx.get(server.url + "/nowhere").json()["error"]["type"] == "not_found_error"
    assert metric(server, 'finemoe_requests_total{outcome="invalid"}') >= len(BAD) + len(BAD_CHAT)
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1 or out.choices[0].finish_reason == "stop"
