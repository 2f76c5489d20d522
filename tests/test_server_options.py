"""`finemoe serve --served-model-name / --chat-template / --api-key` and GET /v1/models/{id}: in-process over a
real engine (starlette's TestClient), then once as a live process spoken to by the `openai` client.

With an API key, every /v1 route needs `Authorization: Bearer KEY` and answers 401 in OpenAI's error format
otherwise; /health and /metrics stay open (probes and Prometheus scrapers)."""
from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient

from finemoe.cli.main import main
from finemoe.config import EngineConfig
from finemoe.engine import Engine
from finemoe.server import create_app
from server_helpers import live_server

NAME = "org/tiny-moe"                     # a served name with a slash, like a hub id
KEY = "sk-test-123"
TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http():
    engine = Engine.from_config(EngineConfig(device="cpu", expert_budget="25%", show_progress=False))
    app = create_app(engine, served_model_name=NAME, chat_template=TEMPLATE, api_key=KEY)
    with TestClient(app) as client:   # runs the lifespan: the scheduler thread starts and stops
        yield client


def assert_openai_error(r, status: int, code: str) -> dict:
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["no-key", "wrong-key", "not-bearer"])
def test_v1_routes_need_the_api_key(http, headers):
    for method, path, body in [("GET", "/v1/models", None), ("GET", f"/v1/models/{NAME}", None),
                               ("POST", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 1})]:
        r = http.request(method, path, headers=headers, json=body)
        assert_openai_error(r, 401, "invalid_api_key")


def test_health_and_metrics_stay_open(http):
    assert http.get("/health").status_code == 200 and http.get("/health").json()["model"] == NAME
    assert http.get("/metrics").status_code == 200


def test_models_list_and_retrieve_by_the_served_name(http):
    listed = http.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in listed] == [NAME]
    r = http.get(f"/v1/models/{NAME}", headers=AUTH)
    assert r.status_code == 200 and r.json() == listed[0]
    err = assert_openai_error(http.get("/v1/models/other", headers=AUTH), 404, "model_not_found")
    assert NAME in err["message"]


def test_requests_name_the_served_model_and_chat_uses_the_given_template(http):
    r = http.post("/v1/completions", headers=AUTH, json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["model"] == NAME
    assert_openai_error(http.post("/v1/completions", headers=AUTH, json={"model": "finemoe-builtin-random-qwen2moe",
                                                                         "prompt": "hi"}), 404, "model_not_found")
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    engine_tokenizer = http.app.state.finemoe.engine.tokenizer
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == len(engine_tokenizer("<<Hi>>", add_special_tokens=False).input_ids)
    assert engine_tokenizer.chat_template != TEMPLATE     # the engine's own tokenizer is untouched


@pytest.mark.parametrize("content,expected", [(None, "cannot read it"), ("", "is empty"),
                                              ("{% for m in messages %}", "fix the Jinja syntax")])
def test_a_bad_chat_template_file_is_one_line_before_the_model_loads(capsys, tmp_path, content, expected):
    path = tmp_path / "chat.jinja"
    if content is not None:
        path.write_text(content)
    code = main(["serve", "--device", "cpu", "--port", "0", "--model", "/no/such/model", "--chat-template", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and expected in err and "--chat-template" in err


def test_live_server_with_the_openai_client(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    args = ["--device", "cpu", "--expert-budget", "25%", "--max-model-len", "256", "--log-level", "warning",
            "--served-model-name", NAME, "--chat-template", str(template), "--api-key", KEY]
    with live_server(args) as server:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert client.models.retrieve(NAME).id == NAME
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("other")
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert out.model == NAME and out.choices[0].finish_reason in ("stop", "length")
