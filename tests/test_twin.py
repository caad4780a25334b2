"""Twin-Merging bundles: dense oracles for the shared merge and the truncated residuals, PEFT, CLI, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_peft_forward, hidden_leftovers
from typer.testing import CliRunner

from loramerge import load_adapter, merge
from loramerge.artifacts.twin import build_twin, compose_twin, load_twin, parse_weights, write_composed
from loramerge.cli.artifacts import twin_app
from loramerge.errors import AdapterLoadError, OutputError, RecipeError


def _dense(path, module) -> torch.Tensor:
    adapter = load_adapter(path)
    if module not in adapter.modules:
        return torch.zeros((), dtype=torch.float64)  # the task has no such module: a zero delta
    return adapter.factors(module).delta().double()


def _delta(module) -> torch.Tensor:
    return module.B.double() @ module.A.double()


def _truncate(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())






@pytest.fixture(scope="module")
def bundle_rank2(three_adapters, tmp_path_factory):
    return build_twin(three_adapters, tmp_path_factory.mktemp("twin") / "bundle", residual_rank=2)


def test_one_hot_composition_equals_shared_plus_the_truncated_expert(three_adapters, bundle_rank2):
    """Dense oracle from the paper: shared = 0.3 * sum_t dW_t; expert_t = SVD_k(dW_t - shared)."""
    assert bundle_rank2.task_names == [load_adapter(p).name for p in three_adapters]
    for path, task in zip(three_adapters, bundle_rank2.task_names, strict=True):
        composed = {m.name: m for m in compose_twin(bundle_rank2, {task: 1.0})}
        assert set(composed) == set(bundle_rank2.module_names)
        for name, module in composed.items():
            shared = 0.3 * sum(_dense(p, name) for p in three_adapters)
            want = shared + _truncate(_dense(path, name) - shared, 2)
            assert _rel(_delta(module), want) < 1e-5, (task, name)
            assert module.rank == bundle_rank2.shared.modules[name].rank + 2


def test_full_residual_rank_gives_back_each_task(three_adapters, tmp_path):
    bundle = build_twin(three_adapters, tmp_path / "bundle", residual_fraction=1.0)
    for path, task in zip(three_adapters, bundle.task_names, strict=True):
        own = load_adapter(path)
        for module in compose_twin(bundle, {task: 1.0}):
            got = _delta(module)
            if module.name in own.modules:
                assert _rel(got, own.factors(module.name).delta().double()) < 1e-5
            else:  # the task has no such module: shared + residual cancel
                shared = bundle.shared_factors(module.name).delta().double()
                assert float(got.norm()) < 1e-5 * float(shared.norm())
    assert all(t["residual_rel_error"] < 1e-6 for t in bundle.manifest["tasks"])


def test_weighted_composition_is_the_exact_concatenation(bundle_rank2):
    weights = {bundle_rank2.task_names[0]: 0.7, bundle_rank2.task_names[2]: -0.2}
    composed = compose_twin(bundle_rank2, weights)
    for module in composed:
        want = bundle_rank2.shared_factors(module.name).delta().double()
        for task, w in weights.items():
            want = want + w * bundle_rank2.residual_factors(task, module.name).delta().double()
        assert _rel(_delta(module), want) < 1e-6
    stacked = bundle_rank2.stacked(composed[0].name)
    assert list(stacked.segments) == ["shared", *bundle_rank2.task_names]
    gate = torch.zeros(stacked.A.shape[0])
    gate[stacked.segments["shared"]] = 1.0
    for task, w in weights.items():
        gate[stacked.segments[task]] = w
    assert _rel((stacked.B * gate).double() @ stacked.A.double(), _delta(composed[0])) < 1e-6
    only_shared = compose_twin(bundle_rank2, {})
    assert [m.rank for m in only_shared] == [bundle_rank2.shared.modules[m.name].rank for m in only_shared]


def test_any_registry_method_can_make_the_shared_adapter(equal_rank_adapters, tmp_path):
    params = {"density": 0.5, "lambda": 0.5}
    bundle = build_twin(equal_rank_adapters, tmp_path / "bundle", shared_method="ties", shared_parameters=params,
                        residual_fraction=0.5)
    reference = merge(adapters=equal_rank_adapters, method="ties", parameters=params)
    for module in reference.modules:
        shared = bundle.shared_factors(module.name).delta().double()
        assert _rel(shared, _delta(module)) < 1e-5
        for path, task in zip(equal_rank_adapters, bundle.task_names, strict=True):
            residual = bundle.residual_factors(task, module.name)
            exact = _dense(path, module.name) - shared
            keep = -(-torch.linalg.matrix_rank(exact, rtol=1e-5).item() // 2)  # ceil(0.5 * numerical rank)
            assert residual.rank == keep
            assert _rel(residual.delta().double(), _truncate(exact, keep)) < 1e-4
    assert bundle.manifest["shared"]["method"] == "ties" and bundle.manifest["residual"] == {"fraction": 0.5}


def test_written_composition_loads_in_peft(bundle_rank2, llama, tmp_path):
    weights = {bundle_rank2.task_names[1]: 0.6, bundle_rank2.task_names[2]: 0.4}
    out = write_composed(bundle_rank2.path, weights, tmp_path / "composed")
    composed = {m.name: _delta(m) for m in compose_twin(bundle_rank2, weights)}
    saved = load_adapter(out)
    assert set(saved.modules) == set(composed)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert_peft_forward(llama, out, composed)


def test_loader_api_for_routers(bundle_rank2):
    bundle = load_twin(bundle_rank2.path)
    assert bundle.task_names == bundle_rank2.task_names
    module = bundle.module_names[0]
    assert bundle.shared_factors(module).rank == bundle.shared.modules[module].rank
    assert all(bundle.residual_factors(t, module).rank == 2 for t in bundle.task_names)
    assert set(bundle.residuals) == set(bundle.task_names)


def test_bad_inputs_give_clear_errors_and_leave_nothing(three_adapters, bundle_rank2, tmp_path):
    with pytest.raises(RecipeError, match="unknown task 'nope'"):
        compose_twin(bundle_rank2, {"nope": 1.0})
    with pytest.raises(RecipeError, match="unknown task"):
        write_composed(bundle_rank2.path, {"nope": 1.0}, tmp_path / "out")
    with pytest.raises(RecipeError, match="not both"):
        build_twin(three_adapters, tmp_path / "b1", residual_rank=2, residual_fraction=0.5)
    with pytest.raises(RecipeError, match=r"\(0, 1\]"):
        build_twin(three_adapters, tmp_path / "b2", residual_fraction=0.0)
    with pytest.raises(RecipeError, match="positive integer"):
        build_twin(three_adapters, tmp_path / "b3", residual_rank=0)
    with pytest.raises(RecipeError, match="unknown merge method"):
        build_twin(three_adapters, tmp_path / "b4", shared_method="nope")
    with pytest.raises(RecipeError, match="finite"):
        compose_twin(bundle_rank2, {bundle_rank2.task_names[0]: float("nan")})
    with pytest.raises(RecipeError, match="name=0.7"):
        parse_weights("a=0.7,b")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        build_twin(three_adapters, tmp_path / "exists")
    with pytest.raises(OutputError, match="already exists"):
        write_composed(bundle_rank2.path, {bundle_rank2.task_names[0]: 1.0}, tmp_path / "exists")
    with pytest.raises(AdapterLoadError, match="not a twin bundle"):
        load_twin(tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    assert hidden_leftovers(tmp_path) == [] and list((tmp_path / "exists").iterdir()) == []


def test_cli_build_and_compose(three_adapters, tmp_path):
    runner = CliRunner()
    res = runner.invoke(twin_app, ["build", *map(str, three_adapters), "-o", str(tmp_path / "bundle"),
                                   "--lambda", "0.5", "--residual-rank", "3"])
    assert res.exit_code == 0, res.output
    bundle = load_twin(tmp_path / "bundle")
    assert bundle.manifest["shared"]["parameters"] == {"lambda": 0.5} and bundle.manifest["residual"] == {"rank": 3}
    first, second = bundle.task_names[:2]
    res = runner.invoke(twin_app, ["compose", str(tmp_path / "bundle"), "--weights", f"{first}=0.7,{second}=0.3",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    saved = load_adapter(tmp_path / "out")
    for module in compose_twin(bundle, {first: 0.7, second: 0.3}):
        assert _rel(saved.factors(module.name).delta().double(), _delta(module)) < 1e-6
    res = runner.invoke(twin_app, ["compose", str(tmp_path / "bundle"), "--weights", "nope=1", "-o",
                                   str(tmp_path / "out2")])
    assert res.exit_code == RecipeError.exit_code and "unknown task" in " ".join(res.output.split())
    res = runner.invoke(twin_app, ["build", *map(str, three_adapters), "-o", str(tmp_path / "bundle")])
    assert res.exit_code == OutputError.exit_code
    res = runner.invoke(twin_app, ["build", *map(str, three_adapters), "-o", str(tmp_path / "b2"),
                                   "--shared-method", "ties", "--param", "density=0.5", "--residual-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    assert load_twin(tmp_path / "b2").manifest["shared"]["parameters"] == {"density": 0.5}
