"""RMM reversible basis: exact at k = N, the best rank-k (PCA) error below, PEFT round trip, CLI, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_peft_forward, hidden_leftovers
from typer.testing import CliRunner

from loramerge import load_adapter
from loramerge.artifacts.basis import MANIFEST_NAME, build_basis, extract_task, load_basis
from loramerge.cli.artifacts import basis_app
from loramerge.errors import AdapterLoadError, OutputError, RecipeError


def _dense_canonical(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's canonical form from a dense SVD: B = U S^1/2, A = S^1/2 V^T, each U column's largest entry > 0."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    sign = torch.sign(U[U.abs().argmax(0), torch.arange(rank)])
    U, Vh = U * sign, Vh * sign[:, None]
    return U * S.sqrt(), S.sqrt()[:, None] * Vh


def _best_error_sq(X: torch.Tensor, k: int, center: bool) -> float:
    """Eckart-Young: the squared Frobenius error of the best rank-k approximation of X's columns."""
    if center:
        X = X - X.mean(dim=1, keepdim=True)
    S = torch.linalg.svdvals(X)
    return float((S[k:] ** 2).sum())






@pytest.fixture(scope="module")
def four_tasks(adapter_factory):
    return [adapter_factory(seed=60 + i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) for i in range(4)]


@pytest.mark.parametrize("granularity", ["module", "row"])
@pytest.mark.parametrize("center", [False, True])
def test_k_equal_n_reconstructs_every_task_exactly(three_adapters, tmp_path, granularity, center):
    """Heterogeneous ranks (4, 6, 8) and partly different modules."""
    artifact = build_basis(three_adapters, 3, tmp_path / "basis", granularity=granularity, center=center)
    for path, task in zip(three_adapters, artifact.task_names, strict=True):
        original = load_adapter(path)
        assert artifact.manifest["tasks"][artifact.task_index(task)]["modules"] == sorted(original.modules)
        for module in original.modules:
            rebuilt = artifact.task_factors(task, module)
            want = original.factors(module).delta().double()
            got = rebuilt.B.double() @ rebuilt.A.double()
            assert float((got - want).norm() / want.norm()) < 1e-5
    for record in artifact.manifest["tasks"]:
        assert record["rel_error"] < 1e-5 and record["max_module_rel_error"] < 1e-5


@pytest.mark.parametrize("granularity", ["module", "row"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_k_below_n_reaches_the_best_rank_k_pca_error(four_tasks, tmp_path, granularity, center, k):
    artifact = build_basis(four_tasks, k, tmp_path / "basis", granularity=granularity, center=center)
    adapters = [load_adapter(p) for p in four_tasks]
    for module in sorted(adapters[0].modules):
        canon = [_dense_canonical(a.factors(module).delta(), 4) for a in adapters]
        rebuilt = [artifact.task_factors(t, module) for t in artifact.task_names]
        for factor, pick, rebuilt_pick in (
            ("B", lambda c: c[0], lambda f: f.B), ("A", lambda c: c[1].T, lambda f: f.A.T),
        ):
            stacked = torch.stack([pick(c) for c in canon])  # (N, P, r)
            if granularity == "module":
                best = _best_error_sq(stacked.reshape(len(canon), -1).T, k, center)
            else:
                best = sum(_best_error_sq(stacked[:, p, :].T, k, center) for p in range(stacked.shape[1]))
            got = sum(float(((rebuilt_pick(f).double() - pick(c)) ** 2).sum()) for f, c in zip(rebuilt, canon, strict=True))
            total = float((stacked ** 2).sum())
            assert best > 1e-3 * total, "the tasks must not be exactly rank-k (else the test cannot fail)"
            assert math.isclose(got, best, rel_tol=1e-3, abs_tol=1e-6 * total), (module, factor, got, best)


def test_manifest_records_errors_and_storage(four_tasks, tmp_path):
    artifact = build_basis(four_tasks, 2, tmp_path / "basis")
    manifest = json.loads((tmp_path / "basis" / MANIFEST_NAME).read_text())
    assert manifest["k"] == 2 and manifest["granularity"] == "module" and manifest["center"] is False
    adapters = [load_adapter(p) for p in four_tasks]
    # storage: per module, k basis factors (d_out x r and d_in x r) + N x k coefficients per factor
    stored = original = 0
    for module in adapters[0].modules:
        info = adapters[0].modules[module]
        stored += 2 * (info.d_out * 4 + info.d_in * 4) + 2 * (4 * 2)
        original += 4 * 4 * (info.d_out + info.d_in)
    assert manifest["storage"]["stored_parameters"] == stored
    assert math.isclose(manifest["storage"]["storage_ratio"], stored / original)
    # each task's relative error of delta_W, measured densely here
    for record, adapter in zip(manifest["tasks"], adapters, strict=True):
        err = norm = 0.0
        for module in adapter.modules:
            f = artifact.task_factors(record["name"], module)
            want = adapter.factors(module).delta().double()
            err += float(((f.B.double() @ f.A.double() - want) ** 2).sum())
            norm += float((want ** 2).sum())
        assert math.isclose(record["rel_error"], math.sqrt(err / norm), rel_tol=1e-5)
        assert 0 < record["rel_error"] < 1


def test_extracted_adapter_loads_in_peft(four_tasks, llama, tmp_path):
    build_basis(four_tasks, 2, tmp_path / "basis", granularity="row")
    artifact = load_basis(tmp_path / "basis")
    task = artifact.task_names[1]
    out = extract_task(tmp_path / "basis", task, tmp_path / "task")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["target_modules"] == ["q_proj", "v_proj"]
    deltas = {}
    for module in artifact.manifest["tasks"][1]["modules"]:
        f = artifact.task_factors(task, module)
        deltas[module] = f.B @ f.A
    assert_peft_forward(llama, out, deltas)


def test_extract_with_k_equal_n_gives_the_original_adapter(three_adapters, tmp_path):
    build_basis(three_adapters, 3, tmp_path / "basis")
    task = load_basis(tmp_path / "basis").task_names[2]
    out = extract_task(tmp_path / "basis", task, tmp_path / "task")
    rebuilt, original = load_adapter(out), load_adapter(three_adapters[2])
    assert set(rebuilt.modules) == set(original.modules)
    for module in original.modules:
        torch.testing.assert_close(rebuilt.factors(module).delta(), original.factors(module).delta(),
                                   rtol=1e-4, atol=1e-6)


def test_bad_inputs_give_clear_errors_and_leave_nothing(four_tasks, tmp_path):
    with pytest.raises(RecipeError, match="positive integer"):
        build_basis(four_tasks, 0, tmp_path / "b0")
    with pytest.raises(RecipeError, match="exceeds the number of tasks"):
        build_basis(four_tasks, 5, tmp_path / "b5")
    with pytest.raises(RecipeError, match="granularity"):
        build_basis(four_tasks, 2, tmp_path / "bg", granularity="column")  # type: ignore[arg-type]
    assert not (tmp_path / "b0").exists() and not (tmp_path / "b5").exists() and not (tmp_path / "bg").exists()
    build_basis(four_tasks, 2, tmp_path / "basis")
    before = (tmp_path / "basis" / MANIFEST_NAME).read_text()
    with pytest.raises(OutputError, match="already exists"):
        build_basis(four_tasks, 1, tmp_path / "basis")
    assert (tmp_path / "basis" / MANIFEST_NAME).read_text() == before
    with pytest.raises(RecipeError, match="unknown task 'nope'"):
        extract_task(tmp_path / "basis", "nope", tmp_path / "task")
    assert not (tmp_path / "task").exists()
    (tmp_path / "task").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        extract_task(tmp_path / "basis", load_basis(tmp_path / "basis").task_names[0], tmp_path / "task")
    with pytest.raises(AdapterLoadError, match="not a basis directory"):
        load_basis(tmp_path / "task")
    assert hidden_leftovers(tmp_path) == []
    rebuilt = build_basis(four_tasks, 1, tmp_path / "basis", force=True)
    assert rebuilt.k == 1


def test_cli_build_and_extract(four_tasks, tmp_path):
    runner = CliRunner()
    res = runner.invoke(basis_app, ["build", *map(str, four_tasks), "-k", "2", "-o", str(tmp_path / "basis"),
                                    "--granularity", "row"])
    assert res.exit_code == 0, res.output
    assert "storage ratio" in " ".join(res.output.split())
    task = load_basis(tmp_path / "basis").task_names[0]
    res = runner.invoke(basis_app, ["extract", str(tmp_path / "basis"), "--task", task, "-o", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert load_adapter(tmp_path / "t").modules
    res = runner.invoke(basis_app, ["extract", str(tmp_path / "basis"), "--task", "nope", "-o", str(tmp_path / "u")])
    assert res.exit_code == RecipeError.exit_code and "unknown task" in " ".join(res.output.split())
    res = runner.invoke(basis_app, ["extract", str(tmp_path / "basis"), "--task", task, "-o", str(tmp_path / "t")])
    assert res.exit_code == OutputError.exit_code and "--force" in " ".join(res.output.split())
    res = runner.invoke(basis_app, ["build", *map(str, four_tasks), "-k", "9", "-o", str(tmp_path / "b9")])
    assert res.exit_code == RecipeError.exit_code and not (tmp_path / "b9").exists()
