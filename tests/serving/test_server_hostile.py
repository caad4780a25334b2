"""The server refuses what ``merge`` refuses, each with a 4xx and the reason: adapters holding NaN, adapters of
another base model (alone or in a mix), mixes of adapters that name different base models; bodies over the
limit get 413 before they are parsed; sampling values inside the accepted range never give a 5xx."""

from __future__ import annotations

import httpx
import pytest
from safetensors.torch import load_file, save_file

from loramerge.demo.toy import make_adapter, tiny_llama
from loramerge.serving.background import BackgroundServer
from loramerge.serving.bounds import Bounds
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.peft_engine import PeftEngine
from loramerge.serving.server import create_app

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def bad_root(serving_base, tmp_path_factory):
    model, _ = serving_base
    root = tmp_path_factory.mktemp("bad-adapters")
    make_adapter(model, root / "good", seed=7, r=4, target_modules=["q_proj"], b_std=0.3)
    nan = make_adapter(model, root / "nan", seed=8, r=4, target_modules=["q_proj", "v_proj"])
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    make_adapter(tiny_llama(seed=1, hidden=64), root / "small", seed=9, r=4, target_modules=["q_proj"],
                 base_name="tiny-llama")  # same base name, other shapes: does not fit the served model
    make_adapter(model, root / "elsewhere", seed=10, r=4, target_modules=["q_proj"], base_name="other-org/other-llama")
    return root


@pytest.fixture(scope="module")
def url(serving_base, adapter_root, bad_root, tmp_path_factory):
    composer = Composer(AdapterCatalog(roots=[adapter_root, bad_root], bounds=Bounds(max_body_bytes=LIMIT)),
                        cache_dir=tmp_path_factory.mktemp("c"), device="cpu")
    engine = PeftEngine(composer, serving_base[1])
    with BackgroundServer(create_app(engine, served_name="tiny-llama")) as address:
        yield address
    engine.close()


def post(url, body, **kw):
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post("/v1/completions", json=body, **kw)


def body(model, **extra):
    return {"model": model, "prompt": "one two", "max_tokens": 3, "temperature": 0, **extra}


@pytest.mark.parametrize("model, status, needles", [
    ("nan", 422, ["NaN or Inf", "module: model.layers.", "fix:"]),
    ("mix:good=0.5,nan=0.5", 422, ["NaN or Inf", "fix:"]),
    ("small", 422, ["does not fit the served base model", "q_proj", "fix:"]),
    ("mix:code=0.5,small=0.5", 422, ["does not fit the served base model"]),
    ("mix:code=0.5,elsewhere=0.5", 422, ["different base models", "fix:"]),
])
def test_unservable_adapters_get_422_with_the_reason(url, bad_root, model, status, needles):
    for _ in range(2):  # the verdict is remembered: the same answer, never a 5xx
        r = post(url, body(model))
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        assert all(n in message for n in needles), message
        assert str(bad_root) not in message  # no server paths leak to clients
    assert post(url, body("good")).status_code == 200
    assert post(url, body("elsewhere")).status_code == 200  # alone, its base name is not compared to --base


@pytest.mark.parametrize("extra", [
    {"temperature": 1.0, "top_p": 5e-324, "seed": 1},  # rounds to 0 in float32: an empty nucleus before
    {"temperature": 1.0, "top_p": 1e-45, "seed": 1},
    {"temperature": 5e-324, "top_p": 0.9, "seed": 1},  # logits / T overflowed to NaN probabilities
    {"temperature": 10.0, "top_p": 0.999999, "seed": 2**63 - 1},
])
def test_sampling_values_in_range_never_fail(url, extra):
    r = post(url, body("code", **extra))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["token_ids"]) == 3


@pytest.mark.parametrize("seed", [-1, 2**63, 10**30])
def test_seeds_out_of_range_get_400(url, seed):
    r = post(url, body("code", seed=seed))
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]


def test_bodies_over_the_limit_get_413_before_parsing(url):
    big = body("code", prompt="one " * (LIMIT // 2))
    r = post(url, big)
    assert r.status_code == 413, r.text
    assert "limit is 65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024

    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        text = client.get("/metrics").text
    assert 'loramerge_requests_total{endpoint="/v1/completions",status="413"}' in text
    assert post(url, body("code")).status_code == 200  # still serving
