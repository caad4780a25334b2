"""The ``serve`` CLI's parsing and engine wiring (reference backend), and the resolver's configuration from
the environment (no vLLM needed for either)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from loramerge.serving.cli import app, build_engine, parse_adapter_pairs
from loramerge.serving.errors import CompositionError
from loramerge.serving.resolver import composer_from_env


def test_parse_adapter_pairs():
    assert parse_adapter_pairs(["code=/a/b", "math=c"]) == {"code": Path("/a/b"), "math": Path("c")}
    for bad in (["code"], ["=x"], ["code="], ["a=x", "a=y"]):
        with pytest.raises(typer.BadParameter):
            parse_adapter_pairs(bad)


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in ("--base", "--adapters", "--router", "--max-lora-rank", "--host", "--port", "--backend"):
        assert option in result.output


def test_cli_reports_bad_adapters(serving_base, tmp_path):
    result = CliRunner().invoke(app, ["--base", str(serving_base[1]), "--adapters", f"x={tmp_path}",
                                      "--backend", "peft"])
    assert result.exit_code != 0 and "not a PEFT adapter directory" in result.output


def test_build_engine_serves(serving_base, adapter_root):
    from loramerge.serving.background import BackgroundServer
    from loramerge.serving.server import create_app

    engine = build_engine(base=str(serving_base[1]), adapters={"mine": adapter_root / "code"}, roots=[adapter_root],
                          router=None, backend="peft", served_name="tiny", max_lora_rank=16, max_loras=4,
                          max_cpu_loras=None, max_model_len=None, dtype="auto", cache_dir=None, cache_size=4,
                          enforce_eager=False, base_rows="auto")
    with BackgroundServer(create_app(engine, served_name="tiny")) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "mix:mine=0.5,math=0.5", "prompt": "one two",
                                                       "max_tokens": 2, "temperature": 0}, timeout=60)
        auto = httpx.post(url + "/v1/completions", json={"model": "auto", "prompt": "x", "max_tokens": 1}, timeout=60)
    engine.close()
    assert r.status_code == 200 and r.json()["composition"]["label"] == "mix:math=0.5,mine=0.5"
    assert auto.status_code == 400 and "needs a router" in auto.json()["error"]["message"]
    assert not engine.composer.cache_dir.exists()  # the temporary cache is removed on close


def test_resolver_configuration_from_env(adapter_root, tmp_path):
    assert composer_from_env({}) is None
    env = {"LORAMERGE_ADAPTERS": f"mine={adapter_root / 'code'}", "LORAMERGE_ADAPTER_ROOTS": str(adapter_root),
           "LORAMERGE_MAX_LORA_RANK": "8", "LORAMERGE_CACHE_DIR": str(tmp_path / "cache")}
    composer = composer_from_env(env)
    assert composer.max_rank == 8 and composer.cache.capacity is None and composer.cache_dir == tmp_path / "cache"
    built = composer.build(composer.resolve(composer.parse("mix:mine=1,wide=1")))
    assert built.adapter.truncated and built.adapter.path.parent == tmp_path / "cache"
    with pytest.raises(CompositionError):
        composer_from_env({"LORAMERGE_ADAPTERS": "no-equals-sign"})
    with pytest.raises(CompositionError):
        composer_from_env({"LORAMERGE_MAX_LORA_RANK": "12", "LORAMERGE_ADAPTER_ROOTS": str(adapter_root)})


def test_auto_with_a_real_router_artifact(serving_base, adapter_root, tmp_path):
    """`serve --router DIR` with a centroid router over base-model embeddings: `auto` routes by the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramerge.routers import CentroidRouter, PooledHiddenEmbedder
    from loramerge.serving.background import BackgroundServer
    from loramerge.serving.cli import load_router
    from loramerge.serving.server import create_app

    base_dir = serving_base[1]
    model, tok = AutoModelForCausalLM.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    data = {"code": ["python function return value", "print loop list sort", "return value print loop"],
            "math": ["one two three four", "five six seven eight", "add sum number answer"]}
    CentroidRouter.fit(data, PooledHiddenEmbedder(model, tok)).save(tmp_path / "router")
    router = load_router(tmp_path / "router", str(base_dir))
    assert router.route(["python function print loop"])[0] == {"code": 1.0}
    engine = build_engine(base=str(base_dir), adapters={}, roots=[adapter_root], router=router, backend="peft",
                          served_name="tiny", max_lora_rank=16, max_loras=4, max_cpu_loras=None, max_model_len=None,
                          dtype="auto", cache_dir=None, cache_size=4, enforce_eager=False, base_rows="auto")
    with BackgroundServer(create_app(engine, served_name="tiny")) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "auto", "prompt": "six seven eight",
                                                       "max_tokens": 2, "temperature": 0}, timeout=60)
    engine.close()
    assert r.status_code == 200, r.text
    assert "math" in r.json()["composition"]["label"]
