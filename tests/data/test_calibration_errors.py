"""Bad input to calibrate / data-informed merges: a clear error, and nothing written."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loramerge.cli.app import app
from loramerge.data.calibration import calibrate
from loramerge.demo.toy import make_tokenizer
from loramerge.errors import DataError, NumericalError, RecipeError
from loramerge.merging.engine import merge

TEXTS = {"a": ["one two three four", "cat dog bird"], "b": ["red green blue", "python function return value"]}


@pytest.fixture(scope="module")
def pair(adapter_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    adapters = {}
    for i, name in enumerate(TEXTS):
        src = adapter_factory(seed=40 + i, r=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
        adapters[name] = shutil.copytree(src, root / name)
    return adapters


@pytest.fixture(scope="module")
def stats(pair, llama_dir, tmp_path_factory):
    return calibrate(llama_dir, pair, TEXTS, tmp_path_factory.mktemp("s") / "stats", show_progress=False)


def regmean(pair, **recipe):
    return merge(adapters=[{"path": str(p), "name": n} for n, p in pair.items()], method="regmean", **recipe)


def test_cli_calibrate_then_merge(pair, llama_dir, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"task": t, "text": x}) + "\n" for t, xs in TEXTS.items() for x in xs))
    runner = CliRunner()
    out = tmp_path / "stats"
    args = ["calibrate", *[f"{n}={p}" for n, p in pair.items()], "--data", str(data), "--base-model", str(llama_dir),
            "-o", str(out), "--max-length", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "truncated" in result.output  # texts longer than --max-length are cut, and it says so
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["max_length"] == 3 and manifest["truncated"] == 2 and manifest["source"] == "adapter"
    again = runner.invoke(app, args)
    assert again.exit_code == 6 and "already exists" in again.output  # never overwritten without --force
    recipe = tmp_path / "regmean.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "calibration": "stats", "parameters": {"alpha": 0.9},
                                      "adapters": [{"path": str(p), "name": n} for n, p in pair.items()]}))
    merged = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()
    base = runner.invoke(app, [*args[:-4], "-o", str(tmp_path / "base-stats"), "--source", "base"])
    assert base.exit_code == 0, base.output
    assert json.loads((tmp_path / "base-stats" / "calibration.json").read_text())["source"] == "base"


def test_stale_statistics_are_refused(pair, stats, tmp_path):
    regmean(pair, calibration=str(stats))  # fresh: fine
    with pytest.raises(DataError, match="another version of adapter 'b'") as info:
        other = shutil.copytree(pair["b"], tmp_path / "b2")
        weights = load_file(str(other / "adapter_model.safetensors"))
        key = next(k for k in weights if "lora_B" in k)
        weights[key] = weights[key] * 2
        save_file(weights, str(other / "adapter_model.safetensors"))
        merge(adapters=[{"path": str(pair["a"]), "name": "a"}, {"path": str(other), "name": "b"}], method="regmean",
              calibration=str(stats), output=tmp_path / "out")
    assert "calibration.json" in str(info.value) and "loramerge calibrate" in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="do not cover adapter"):
        merge(adapters=[{"path": str(pair["a"]), "name": "a"}, {"path": str(other), "name": "zz"}], method="regmean",
              calibration=str(stats))
    with pytest.raises(DataError, match="computed with base model .* the recipe names 'another/model'"):
        regmean(pair, calibration=str(stats), base_model="another/model")
    with pytest.raises(DataError, match="the data of 'a' differ"):
        regmean(pair, calibration=str(stats), data={"a": ["other texts"], "b": TEXTS["b"]})
    with pytest.raises(DataError, match="no calibration statistics here"):
        regmean(pair, calibration=str(tmp_path / "nowhere"))
    with pytest.raises(RecipeError, match="learns from data"):
        regmean(pair)
    with pytest.raises(RecipeError, match="needs `base_model:`"):
        regmean(pair, data=TEXTS)


def test_data_on_the_fly_equals_the_cached_statistics(pair, stats, llama_dir, tmp_path):
    cached = regmean(pair, calibration=str(stats), rank="exact").factors()
    fresh = regmean(pair, data=TEXTS, base_model=str(llama_dir), rank="exact").factors()
    for module, f in cached.items():
        torch.testing.assert_close(fresh[module].delta(), f.delta())
    target = tmp_path / "cache"  # `calibration: DIR` that does not exist yet + `data:` computes into DIR
    regmean(pair, data=TEXTS, base_model=str(llama_dir), calibration=str(target))
    assert (target / "calibration.json").is_file()


def test_bad_data_writes_nothing(pair, llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "stats"
    with pytest.raises(DataError, match="empty") as info:
        calibrate(llama_dir, pair, {"a": empty, "b": empty}, out, show_progress=False)
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="no examples for \\['b'\\]"):
        calibrate(llama_dir, pair, {"a": TEXTS["a"]}, out, show_progress=False)
    with pytest.raises(DataError, match="not among"):
        calibrate(llama_dir, pair, {**TEXTS, "c": ["x"]}, out, show_progress=False)
    assert not out.exists()


def test_nan_statistics_are_refused(pair, llama, stats, tmp_path):
    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    out = tmp_path / "stats"
    with pytest.raises(NumericalError, match="NaN"):
        calibrate((broken, make_tokenizer()), pair, TEXTS, out, show_progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())  # not even a temporary directory is left
    poisoned = shutil.copytree(stats, tmp_path / "poisoned")
    file = poisoned / json.loads((poisoned / "calibration.json").read_text())["adapters"][0]["file"]
    tensors = load_file(str(file))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file))
    with pytest.raises(NumericalError, match="NaN") as info:
        regmean(pair, calibration=str(poisoned), output=tmp_path / "merged")
    assert str(file) in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_truncation_is_reported(pair, llama_dir, tmp_path, caplog):
    long = {"a": [" ".join(["one"] * 300)], "b": ["red"]}
    with caplog.at_level(logging.WARNING, logger="loramerge.data.calibration"):
        out = calibrate(llama_dir, pair, long, tmp_path / "s", show_progress=False)  # context: 128 positions
    manifest = json.loads((out / "calibration.json").read_text())
    assert manifest["max_length"] == 128 and manifest["truncated"] == 1
    assert manifest["adapters"][0]["tokens"] == 128
    assert "1 of 1 texts of 'a' are longer than 128 tokens" in caplog.text
