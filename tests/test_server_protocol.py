"""The server's pieces in-process: incremental streaming text, request parsing, and the app over a real
engine (served greedy text equals Engine.generate's; chat without a chat template is a clear 400)."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from finemoe.server import create_app
from finemoe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from finemoe.server.textstream import IncrementalText


def stream_of(texts: list[str], stop: tuple[str, ...] = ()) -> list[str]:
    """Feed successive decoded texts (the last is final) and collect the deltas."""
    inc = IncrementalText(stop)
    return [inc.delta(t, final=(i == len(texts) - 1)) for i, t in enumerate(texts)]


def test_incremental_text_holds_back_an_incomplete_utf8_character():
    # "é" is two bytes: after the first one the decoded text ends with U+FFFD, which must not be sent.
    deltas = stream_of(["a", "a\ufffd", "aé", "aéb"])
    assert deltas == ["a", "", "é", "b"] and "".join(deltas) == "aéb"


def test_incremental_text_holds_back_the_start_of_a_stop_string_and_releases_it():
    assert stream_of(["x", "xE", "xEN", "xENx", "xENx"], stop=("END",)) == ["x", "", "", "ENx", ""]
    # the stop string completes: the engine cut it, and nothing of it was ever sent
    assert "".join(stream_of(["x", "xE", "xEN", "x"], stop=("END",))) == "x"


def test_incremental_text_flushes_everything_at_the_end():
    assert "".join(stream_of(["ab", "ab\ufffd", "ab\ufffd\ufffd"])) == "ab\ufffd\ufffd"


def test_neutral_values_of_unsupported_parameters_are_accepted():
    body = {"model": "m", "prompt": "x", "n": 1, "logprobs": None, "presence_penalty": 0, "echo": False,
            "stop": ["a", "b"], "user": "me"}
    req = parse_body(json.dumps(body).encode(), CompletionRequest)
    assert req.stop_strings() == ("a", "b") and req.prompt_input() == "x"


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
])
def test_chat_request_problems_name_their_parameter(body, param):
    with pytest.raises(APIError) as info:
        req = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
        req.stop_strings()
    assert info.value.status == 400 and (info.value.param or "").startswith(param)


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_config(EngineConfig(device="cpu", expert_budget="25%", show_progress=False))
    yield e
    e.close()


def test_served_greedy_text_equals_engine_generate(engine):
    prompt = "Exact serving"
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text
    with TestClient(create_app(engine)) as http:   # runs the lifespan: the scheduler thread starts and stops
        r = http.post("/v1/completions", json={"model": engine.model_name, "prompt": prompt, "max_tokens": 6,
                                               "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected


def test_chat_without_a_chat_template_is_a_clear_400(engine):
    app = create_app(engine)
    app.state.finemoe.tokenizer.chat_template = None   # the app's own tokenizer copy; the engine's is untouched
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions",
                      json={"model": engine.model_name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and "/v1/completions" in err["message"]
    assert engine.tokenizer.chat_template is not None
