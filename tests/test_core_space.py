"""Core-space merging (arXiv 2509.17786): lossless projection, exact linear merges, and the non-linear methods
equal to the same operation applied to densely computed cores."""

from __future__ import annotations

import pytest
import torch
from test_core_merge import WEIGHTS, assert_peft_forward_matches, expected_model

from loramerge import merge
from loramerge.core.adapter import LoraFactors
from loramerge.errors import RecipeError
from loramerge.merging.methods import ModuleInputs, get_method
from loramerge.merging.methods.core_space import core_bases, in_core_space
from loramerge.merging.methods.spectral import tsv

F64 = torch.float64


def make_inputs(d_out=40, d_in=30, ranks=(3, 5, 8), weights=(0.9, -0.4, 0.6), seed=0) -> ModuleInputs:
    gen = torch.Generator().manual_seed(seed)
    factors = tuple(
        LoraFactors(A=torch.randn(r, d_in, generator=gen, dtype=F64), B=torch.randn(d_out, r, generator=gen, dtype=F64))
        for r in ranks
    )
    return ModuleInputs(name="layers.0.q_proj", factors=factors, weights=tuple(weights),
                        adapter_names=tuple(f"t{i}" for i in range(len(ranks))), seed=seed)


def delta(result) -> torch.Tensor:
    return result.B @ result.A


def dense_cores(inputs: ModuleInputs) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """w_t U^T (B_t A_t) V, the cores computed from the dense deltas (rounding noise on exact zeros cleared:
    a task's core is zero outside the span of the tasks stacked before it and its own)."""
    U, V = core_bases(inputs.factors)
    cores = [w * (U.T @ (f.B @ f.A) @ V) for f, w in inputs.weighted()]
    return [torch.where(m.abs() > 1e-12 * m.abs().max(), m, 0.0) for m in cores], U, V


def test_projection_is_lossless_with_mixed_ranks():
    inputs = make_inputs()
    U, V = core_bases(inputs.factors)
    assert U.shape == (40, 16) and V.shape == (30, 16)
    for f in inputs.factors:
        M = (U.T @ f.B) @ (f.A @ V)
        torch.testing.assert_close(U @ M @ V.T, f.B @ f.A, rtol=1e-10, atol=1e-10)


def test_task_arithmetic_is_exact_in_core_space():
    inputs = make_inputs()
    cfg = get_method("task_arithmetic").make_config({"lambda": 0.7})
    out = in_core_space(get_method("task_arithmetic").fn)(cfg, inputs)
    dense_sum = 0.7 * sum(w * f.B @ f.A for f, w in inputs.weighted())
    torch.testing.assert_close(delta(out), dense_sum, rtol=1e-10, atol=1e-10)


def _ties_reference(cores: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES from the paper on dense matrices: top-k per task, sign by total mass, disjoint mean."""
    trimmed = []
    for m in cores:
        k = int(density * m.numel())
        thr = m.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(m.abs() >= thr, m, 0.0))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_ties_in_core_space_equals_ties_on_the_dense_cores():
    inputs = make_inputs()
    cfg = get_method("ties").make_config({"density": 0.3})
    out = in_core_space(get_method("ties").fn)(cfg, inputs)
    cores, U, V = dense_cores(inputs)
    torch.testing.assert_close(delta(out), U @ _ties_reference(cores, 0.3) @ V.T, rtol=1e-9, atol=1e-9)
    dense_space = get_method("ties").fn(cfg, inputs).delta
    assert not torch.allclose(delta(out), dense_space, atol=1e-3)  # a different method than dense-space TIES


def test_dare_in_core_space_equals_the_same_drop_on_the_dense_cores():
    from loramerge.core.ops import generator_for

    inputs = make_inputs()
    cfg = get_method("dare_linear").make_config({"density": 0.6})
    out = in_core_space(get_method("dare_linear").fn)(cfg, inputs)
    cores, U, V = dense_cores(inputs)
    ref = torch.zeros_like(cores[0])
    for m, name in zip(cores, inputs.adapter_names):
        gen = generator_for(inputs.seed, "dare", inputs.name, name)
        keep = torch.rand(m.shape, generator=gen, dtype=torch.float32) < 0.6
        ref += m * keep / 0.6
    torch.testing.assert_close(delta(out), U @ ref @ V.T, rtol=1e-9, atol=1e-9)


def test_tsv_in_core_space_equals_tsv_on_the_dense_cores_and_in_dense_space():
    inputs = make_inputs()
    cfg = get_method("tsv").make_config({})
    out = in_core_space(tsv)(cfg, inputs)
    cores, U, V = dense_cores(inputs)
    eye = torch.eye(cores[0].shape[1], dtype=F64)
    on_cores = ModuleInputs(name=inputs.name, factors=tuple(LoraFactors(A=eye, B=m) for m in cores),
                            weights=(1.0,) * 3, adapter_names=inputs.adapter_names)
    # TSV's budget is min(d_out, d_in) / T: give the dense-core run the module's budget
    cfg_budget = get_method("tsv").make_config({"k_per_task": 30 // 3})
    torch.testing.assert_close(delta(out), U @ delta(tsv(cfg_budget, on_cores)) @ V.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(delta(out), delta(tsv(cfg, inputs)), rtol=1e-8, atol=1e-8)  # orthogonal invariance


def test_core_space_merge_loads_in_peft_and_is_exact_for_task_arithmetic(llama, three_adapters, tmp_path):
    result = merge(adapters=three_adapters, method="task_arithmetic", weights=WEIGHTS, space="core",
                   output=tmp_path / "out")
    assert result.max_rel_error == 0.0
    assert_peft_forward_matches(llama, tmp_path / "out", expected_model(llama, three_adapters, WEIGHTS))
    ties = merge(adapters=three_adapters, method="ties", weights=WEIGHTS, space="core", output=tmp_path / "ties")
    assert ties.max_rel_error == 0.0 and all(r.rank <= sum(r.input_ranks) for r in ties.reports)


@pytest.mark.parametrize("recipe, message", [
    ({"method": "iso_c", "space": "core"}, "does not support space: core"),
    ({"method": "ties", "space": "core", "factorwise": True}, "cannot be combined"),
    ({"method": "ties", "space": "spectral"}, "space"),
])
def test_unsupported_core_space_is_refused(three_adapters, recipe, message):
    with pytest.raises(RecipeError, match=message):
        merge({**recipe, "adapters": [str(p) for p in three_adapters]})
