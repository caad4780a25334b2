"""The OpenAI-compatible server over the reference (transformers + PEFT) engine, on 127.0.0.1:
outputs equal PEFT generate with the composed adapter, streaming equals non-streaming, the official
``openai`` client works, metrics count, hostile requests get 4xx and the server stays up."""

from __future__ import annotations

import json

import httpx
import pytest

from loramerge.serving.background import BackgroundServer
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.peft_engine import PeftEngine
from loramerge.serving.server import create_app


class TableRouter:
    """Routes by the prompt's first word (a stand-in for a trained router: any object with ``route``)."""

    table = {"write": {"code": 0.8, "math": 0.2}, "add": {"math": 1.0}}

    def route(self, prompts):
        return [dict(self.table.get(p.split()[0], {})) for p in prompts]


@pytest.fixture(scope="module")
def served(serving_base, adapter_root, tmp_path_factory):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=16, cache_dir=tmp_path_factory.mktemp("c"),
                        router=TableRouter(), device="cpu")
    engine = PeftEngine(composer, serving_base[1])
    with BackgroundServer(create_app(engine, served_name="tiny-llama")) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def complete(client, model, prompt, n=5, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def adapter_dir(engine, model):
    built = engine.composer.build(engine.composer.resolve(engine.composer.parse(model)))
    return built.adapter.path if built.adapter else None


@pytest.mark.parametrize("model", ["tiny-llama", "code", "mix:code=0.7,math=0.3", "mix:chat=2,math=-1;method=average"])
def test_completions_equal_peft(client, served, oracle, prompts, model):
    _, engine = served
    r = complete(client, model, prompts[1])
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    want = oracle.greedy(adapter_dir(engine, model), choice["prompt_token_ids"], 5)
    assert choice["token_ids"] == want
    assert body["composition"]["label"] == ("base" if model == "tiny-llama" else model)
    assert r.headers["x-loramerge-composition"] == body["composition"]["label"]
    assert body["usage"]["completion_tokens"] == 5 and body["model"] == model


def test_auto_routes_by_prompt(client, served, oracle):
    _, engine = served
    r = complete(client, "auto", "write a python function")
    body = r.json()
    assert body["composition"]["label"] == "mix:code=0.8,math=0.2" and body["composition"]["routed"]
    choice = body["choices"][0]
    assert choice["token_ids"] == oracle.greedy(adapter_dir(engine, "mix:code=0.8,math=0.2"),
                                                choice["prompt_token_ids"], 5)
    assert complete(client, "auto", "add two numbers").json()["composition"]["label"] == "math"
    assert complete(client, "auto", "hello world").json()["composition"]["label"] == "base"


def test_structured_composition_and_truncation_report(client):
    r = complete(client, "ignored-when-composition-is-given", "one two", composition={
        "adapters": {"code": 1.0, "wide": 1.0}, "method": "task_arithmetic"})
    assert r.status_code == 200, r.text
    comp = r.json()["composition"]
    assert comp["label"] == "mix:code=1,wide=1" and comp["truncated"] and comp["rank"] == 16
    assert comp["source_rank"] == 24 and 0 < comp["max_rel_error"] < 1


def test_prompt_list_gives_one_choice_each(client, prompts):
    r = complete(client, "code", prompts[:3], n=3)
    assert r.status_code == 200
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and all(len(c["token_ids"]) == 3 for c in choices)


def read_sse(response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_streaming_equals_non_streaming(client, prompts):
    whole = complete(client, "mix:code=0.7,math=0.3", prompts[0], n=6).json()["choices"][0]
    body = {"model": "mix:code=0.7,math=0.3", "prompt": prompts[0], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-loramerge-composition"] == "mix:code=0.7,math=0.3"
        events = read_sse(r)
    assert events[0]["composition"]["label"] == "mix:code=0.7,math=0.3"
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole["token_ids"]
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_and_chat_streaming(client):
    messages = [{"role": "user", "content": "write a python function"}]
    body = {"model": "code", "messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion" and whole["composition"]["label"] == "code"
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        events = read_sse(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == whole["choices"][0]["message"]["content"]


def test_models_health_metrics(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == "tiny-llama" and {"code", "math", "chat", "wide", "auto"} <= set(ids)
    assert client.get("/health").json()["status"] == "ok"
    complete(client, "math", "one two")
    complete(client, "math", "one two")
    text = client.get("/metrics").text
    assert 'loramerge_requests_total{endpoint="/v1/completions",status="200"}' in text
    hits = [line for line in text.splitlines() if line.startswith("loramerge_composition_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1
    assert "loramerge_composition_seconds_bucket" in text


HOSTILE = [
    ({"model": "../../etc/passwd", "prompt": "x"}, 400, "characters"),
    ({"model": "mix:../code=1", "prompt": "x"}, 400, "characters"),
    ({"model": "basis:../../x/task", "prompt": "x"}, 400, "characters"),
    ({"model": "mix:" + ",".join(f"a{i}=1" for i in range(50)), "prompt": "x"}, 400, "limit is 8"),
    ({"model": "mix:code=1e300", "prompt": "x"}, 400, "finite"),
    ({"model": "ghost", "prompt": "x"}, 404, "unknown adapter"),
    ({"model": "mix:code=0.5,ghost=0.5", "prompt": "x"}, 404, "unknown adapter"),
    ({"model": "code", "prompt": "one " * 5000}, 400, "limit"),
    ({"model": "code", "prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": "code", "prompt": "x", "n": 3}, 400, "invalid request"),
    ({"model": "code", "prompt": [1, 2, 10 ** 6]}, 400, "token ids"),
    ({"model": "code", "prompt": ""}, 400, "prompt"),
    ({"model": "code"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
    ({"model": "code", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "code", "prompt": "x", "composition": {"adapters": {"code": "lots"}}}, 400, "number"),
    ({"model": "code", "prompt": ["a"] * 40}, 400, "at most 16 prompts"),
]


@pytest.mark.parametrize("body, status, needle", HOSTILE)
def test_hostile_requests_get_4xx(client, body, status, needle):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_json_and_chat_bounds(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"model": "code", "messages": [{"role": "user", "content": "x"}] * 100})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"model": "code", "messages": []})
    assert r.status_code == 400
    assert client.get("/health").status_code == 200
    assert complete(client, "code", "one two").status_code == 200  # still serving


def test_official_openai_client(served):
    import openai
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    completion = client.completions.create(model="mix:code=0.7,math=0.3", prompt="one two three", max_tokens=4,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert completion.model_extra["composition"]["label"] == "mix:code=0.7,math=0.3"
    assert len(completion.choices[0].model_extra["token_ids"]) == 4
    stream = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "write code"}],
                                            max_tokens=3, temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].model_extra["composition"]["label"] == "mix:code=0.8,math=0.2"
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    assert [m.id for m in client.models.list()][0] == "tiny-llama"
