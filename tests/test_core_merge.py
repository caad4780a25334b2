"""End to end: merge, save, load with PEFT, and compare the forward with base + the expected delta."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from peft import PeftModel
from typer.testing import CliRunner

from loramerge import load_adapter, merge
from loramerge.cli.app import app
from loramerge.errors import IncompatibleAdaptersError, OutputError, RecipeError
from loramerge.merging.recipe import load_recipe

WEIGHTS = [0.5, 0.3, 0.9]


def expected_model(base, paths, weights, transpose_for=()):
    """The base model with sum_t w_t dW_t added to each weight, computed densely from PEFT's own deltas."""
    model = copy.deepcopy(base)
    for path, w in zip(paths, weights):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path)
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.get_delta_weight("default")
                with torch.no_grad():
                    model.get_submodule(name).weight += w * delta
            elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                with torch.no_grad():
                    model.get_submodule(name).weight += w * module.get_delta_weight("default")
    return model


def logits(model, seed=0, vocab=96):
    ids = torch.randint(4, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def assert_peft_forward_matches(base, out_dir, reference, atol=1e-5):
    merged = PeftModel.from_pretrained(copy.deepcopy(base), out_dir)
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-4, atol=atol)


def test_mixed_rank_exact_merge_loads_in_peft(llama, three_adapters, tmp_path):
    result = merge(adapters=three_adapters, method="task_arithmetic", weights=WEIGHTS, output=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert result.max_rel_error == 0.0
    assert_peft_forward_matches(llama, tmp_path / "out", expected_model(llama, three_adapters, WEIGHTS))


def test_rslora_and_patterns_merge_correctly(llama, adapter_factory, tmp_path):
    paths = [
        adapter_factory(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        adapter_factory(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}),
    ]
    merge(adapters=paths, method="task_arithmetic", weights=[1.0, 0.5], output=tmp_path / "out")
    assert_peft_forward_matches(llama, tmp_path / "out", expected_model(llama, paths, [1.0, 0.5]))


def test_gpt2_conv1d_merge(gpt2, adapter_factory, tmp_path):
    paths = [adapter_factory(base=gpt2, r=r, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True) for r in (2, 4)]
    merge(adapters=paths, method="average", output=tmp_path / "out")
    merged = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "out")
    torch.testing.assert_close(logits(merged), logits(expected_model(gpt2, paths, [0.5, 0.5])), rtol=1e-4, atol=1e-5)


def test_embedding_lora_merge(llama, adapter_factory, tmp_path):
    paths = [adapter_factory(r=r, target_modules=["embed_tokens", "q_proj"]) for r in (2, 3)]
    merge(adapters=paths, method="task_arithmetic", weights=[1.0, -0.5], output=tmp_path / "out")
    assert_peft_forward_matches(llama, tmp_path / "out", expected_model(llama, paths, [1.0, -0.5]))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare_linear", {"density": 0.7}),
                                           ("della", {}), ("breadcrumbs", {"density": 0.5}), ("magnitude_prune", {})])
def test_elementwise_merge_with_exact_rank_equals_its_dense_result(llama, three_adapters, tmp_path, method, params):
    """With rank: exact the saved adapter reproduces the method's dense result; PEFT's forward sees it."""
    result = merge(adapters=three_adapters, method=method, parameters=params, rank="exact", output=tmp_path / "o")
    assert result.max_rel_error == 0.0
    model = copy.deepcopy(llama)
    for name, f in result.factors().items():
        with torch.no_grad():
            model.get_submodule(name).weight += f.delta()
    assert_peft_forward_matches(llama, tmp_path / "o", model)


def test_truncation_reports_the_error_it_makes(three_adapters):
    result = merge(adapters=three_adapters, method="task_arithmetic", rank=3)
    adapters = [load_adapter(p) for p in three_adapters]
    for report, module in zip(result.reports, result.modules):
        dense = sum(a.factors(report.name).delta() for a in adapters if report.name in a.modules)
        measured = torch.linalg.norm(dense - module.B @ module.A) / torch.linalg.norm(dense)
        assert report.rank == 3
        assert report.rel_error == pytest.approx(float(measured), abs=1e-4)


def test_dtype_follows_the_inputs_unless_told(adapter_factory, tmp_path):
    paths = [adapter_factory(r=4, dtype=torch.bfloat16) for _ in range(2)]
    merge(adapters=paths, method="ties", output=tmp_path / "bf16")
    merge(adapters=paths, method="ties", output=tmp_path / "fp32", dtype="float32")
    assert load_adapter(tmp_path / "bf16").dtype == torch.bfloat16
    assert load_adapter(tmp_path / "fp32").dtype == torch.float32


def test_model_card_records_recipe_inputs_and_version(three_adapters, tmp_path):
    from loramerge import __version__

    merge(adapters=three_adapters, method="ties", weights=WEIGHTS, parameters={"density": 0.3}, output=tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: tiny-llama" in card
    assert __version__ in card and "arxiv.org/abs/2306.01708" in card and "density: 0.3" in card
    for path in three_adapters:
        assert load_adapter(path).sha256 in card
    manifest = json.loads((tmp_path / "o" / "loramerge.json").read_text())
    assert [i["weight"] for i in manifest["inputs"]] == WEIGHTS


def test_existing_output_is_kept_unless_forced(three_adapters, tmp_path):
    out = tmp_path / "o"
    merge(adapters=three_adapters, method="average", output=out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already exists") as info:
        merge(adapters=three_adapters, method="task_arithmetic", output=out)
    assert "--force" in info.value.fix
    assert (out / "adapter_model.safetensors").read_bytes() == before
    merge(adapters=three_adapters, method="task_arithmetic", output=out, force=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_failed_write_leaves_nothing_behind(three_adapters, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        merge(adapters=three_adapters, method="average", output=tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_different_base_models_are_refused(adapter_factory, tmp_path):
    a = adapter_factory(r=4, base_name="org/base-a")
    b = adapter_factory(r=4, base_name="org/base-b")
    with pytest.raises(IncompatibleAdaptersError, match="different base models") as info:
        merge(adapters=[a, b], method="average")
    assert "base_model" in info.value.fix
    merge(adapters=[a, b], method="average", base_model="org/base-a")  # the user vouches for it


def test_shape_mismatch_names_the_module(adapter_factory, gpt2, llama):
    from loramerge.demo.toy import tiny_llama

    wide = tiny_llama(seed=1, hidden=32)
    a = adapter_factory(r=4)
    b = adapter_factory(base=wide, r=4)
    with pytest.raises(IncompatibleAdaptersError, match="shape mismatch") as info:
        merge(adapters=[a, b], method="average")
    assert info.value.module == "model.layers.0.self_attn.q_proj"


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_recipe_file_and_python_api_agree(three_adapters, tmp_path):
    recipe = write_recipe(tmp_path, {
        "method": "ties", "adapters": [{"path": str(p), "weight": w} for p, w in zip(three_adapters, WEIGHTS)],
        "parameters": {"density": 0.3}, "rank": {"energy": 0.95}, "dtype": "float32",
    })
    from_file = merge(recipe)
    from_api = merge(adapters=three_adapters, weights=WEIGHTS, method="ties", parameters={"density": 0.3},
                     rank={"energy": 0.95}, dtype="float32")
    for m1, m2 in zip(from_file.modules, from_api.modules):
        torch.testing.assert_close(m1.B @ m1.A, m2.B @ m2.A)


@pytest.mark.parametrize("data,message", [
    ({"methd": "ties", "adapters": ["x"]}, "did you mean 'method'"),
    ({"method": "tise", "adapters": ["x"]}, "did you mean 'ties'"),
    ({"method": "ties", "adapters": ["x"], "parameters": {"desnity": 0.2}}, "did you mean 'density'"),
    ({"method": "ties", "adapters": []}, "adapters"),
    ({"method": "ties", "adapters": ["x"], "rank": "big"}, "rank"),
    ({"method": "ties", "adapters": [{"path": "x", "wieght": 1}]}, "did you mean 'weight'"),
])
def test_recipe_errors_point_at_the_key(tmp_path, data, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, data))


def test_relative_paths_resolve_against_the_recipe(three_adapters, tmp_path):
    recipe_dir = three_adapters[0].parent
    path = recipe_dir / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "average", "adapters": [p.name for p in three_adapters]}))
    assert [e.path for e in load_recipe(path).adapters] == [str(p.resolve()) for p in three_adapters]


def test_cli_merge_inspect_and_methods(three_adapters, tmp_path):
    runner = CliRunner()
    recipe = write_recipe(tmp_path, {"method": "task_arithmetic", "adapters": [str(p) for p in three_adapters],
                                     "rank": 6})
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", recipe, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (out / "adapter_config.json").is_file()
    again = runner.invoke(app, ["merge", recipe, "-o", str(out)])
    assert again.exit_code == OutputError.exit_code and "already exists" in again.output
    result = runner.invoke(app, ["inspect", str(three_adapters[0]), str(three_adapters[1]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["adapters"][0]["total_rank"] == 4 * 6 and len(report["pairs"]) == 1
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "ties" in result.output and "della" in result.output
    bad = runner.invoke(app, ["merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == RecipeError.exit_code and "recipe file not found" in bad.output


def test_inspect_overlap_oracles(adapter_factory, tmp_path):
    """An adapter against itself: cosine 1, subspace overlap 1; against its negation: cosine -1."""
    from loramerge.analysis.inspect import pairwise_overlap

    path = adapter_factory(r=4)
    neg = merge(adapters=[path], method="task_arithmetic", weights=[-2.0], output=tmp_path / "neg")
    assert neg.output is not None
    copy_dir = tmp_path / "same"
    merge(adapters=[path], method="task_arithmetic", output=copy_dir)
    pairs = pairwise_overlap([load_adapter(path), load_adapter(copy_dir), load_adapter(tmp_path / "neg")])
    same, opposite = pairs[0], pairs[1]
    assert same.cosine == pytest.approx(1.0, abs=1e-5) and same.subspace_overlap == pytest.approx(1.0, abs=1e-4)
    assert opposite.cosine == pytest.approx(-1.0, abs=1e-5)


def test_cli_compare_with_task_loss(llama_dir, equal_rank_adapters, tmp_path, monkeypatch):
    from rich.console import Console

    import loramerge.cli.app

    monkeypatch.setattr(loramerge.cli.app, "console", Console(width=200))
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"text": "one two three four", "task": "count"}\n{"text": "cat dog bird fish", "task": "animals"}\n')
    result = CliRunner().invoke(app, ["compare", *map(str, equal_rank_adapters), "-o", str(tmp_path / "cmp"),
                                      "--methods", "task_arithmetic,ties", "--base", str(llama_dir), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "task_arithmetic" in result.output and "animals" in result.output
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == ["task_arithmetic_rank_auto",
                                                                                   "ties_rank_auto"]
