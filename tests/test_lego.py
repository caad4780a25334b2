"""LoRA-LEGO: oracles are the exact concatenation, planted clusters, dense norms, and PEFT's forward."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_peft_forward

from loramerge import load_adapter, merge
from loramerge.artifacts.shrink import shrink_adapter
from loramerge.core.adapter import LoraFactors
from loramerge.errors import RecipeError
from loramerge.merging.methods import ModuleInputs, get_method
from loramerge.merging.methods.lego import (
    LegoConfig,
    Units,
    canonicalize,
    kmeans,
    lego_merge,
    lora_lego,
)

EXACT = {"parameter_reweight": False, "output_reweight": "none"}


def _dense_sum(paths, weights, module):
    total = None
    for path, w in zip(paths, weights, strict=True):
        adapter = load_adapter(path)
        if module in adapter.modules:
            d = w * adapter.factors(module).delta().double()
            total = d if total is None else total + d
    return total


def _unit_products(B: torch.Tensor, A: torch.Tensor) -> list[torch.Tensor]:
    return [torch.outer(B[:, j].double(), A[j].double()) for j in range(A.shape[0])]




def _inputs(factors: list[LoraFactors], weights=None, seed=0) -> ModuleInputs:
    return ModuleInputs(name="m", factors=tuple(factors), weights=tuple(weights or [1.0] * len(factors)),
                        adapter_names=tuple(f"t{i}" for i in range(len(factors))), seed=seed)


def test_k_equal_total_rank_reproduces_the_concatenated_units(three_adapters):
    weights = [0.5, 1.0, -0.7]
    total_rank = 4 + 6 + 8
    result = merge(adapters=three_adapters, weights=weights, method="lora_lego", parameters={"k": total_rank, **EXACT})
    for module in result.modules:
        want = _dense_sum(three_adapters, weights, module.name)
        torch.testing.assert_close((module.B.double() @ module.A.double()), want, rtol=1e-5, atol=1e-6)
    # unit by unit: every merged unit is one weighted input unit (gauge and sign aside)
    name = "model.layers.0.self_attn.q_proj"
    merged = next(m for m in result.modules if m.name == name)
    inputs = []
    for path, w in zip(three_adapters, weights, strict=True):
        f = load_adapter(path).factors(name)
        inputs += _unit_products(w * f.B, f.A)
    outputs = _unit_products(merged.B, merged.A)
    assert len(outputs) == len(inputs) == 4 + 6 + 8
    for out in outputs:
        dist = min(float((out - inp).norm() / inp.norm()) for inp in inputs)
        assert dist < 1e-5


def test_gauge_and_sign_are_canonicalised_before_clustering():
    """An adapter and a re-gauged, sign-flipped copy of it cluster unit by unit: the merge is exact."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    B = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    G = torch.tensor([2.0, -0.5, 3.0, -1.0, 0.25], dtype=torch.float64)
    f1 = LoraFactors(A=A, B=B)
    f2 = LoraFactors(A=A / G[:, None], B=B * G)  # same delta, different gauge and signs
    cfg = LegoConfig(k=5, output_reweight="none")
    out = lora_lego(cfg, _inputs([f1, f2], weights=[1.0, 1.0]))
    # every cluster holds the same unit twice: the centroid is that unit, so the merge is delta (the mean)
    torch.testing.assert_close(out.B @ out.A, B @ A, rtol=1e-9, atol=1e-9)
    # a factor mean without canonicalisation cancels: the test above could fail
    naive = ((B + B * G) / 2) @ ((A + A / G[:, None]) / 2)
    assert float((naive - B @ A).norm() / (B @ A).norm()) > 0.3


def test_planted_clusters_are_recovered_despite_noise_gauge_and_sign():
    gen = torch.Generator().manual_seed(7)
    r, d_in, d_out = 4, 48, 36
    a_star = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b_star = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    factors = []
    for _ in range(3):
        perm = torch.randperm(r, generator=gen)
        c = (torch.rand(r, generator=gen, dtype=torch.float64) + 0.5) * torch.where(
            torch.rand(r, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        A = (a_star[perm] + 1e-3 * torch.randn(r, d_in, generator=gen, dtype=torch.float64)) * c[:, None]
        B = (b_star[:, perm] + 1e-3 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)) / c
        factors.append(LoraFactors(A=A, B=B))
    out = lora_lego(LegoConfig(k=r, output_reweight="none"), _inputs(factors))
    want = b_star @ a_star  # each cluster's centroid is its prototype unit
    assert float((out.B @ out.A - want).norm() / want.norm()) < 1e-2


def test_parameter_reweighting_restores_the_member_norm():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    units = Units(a=a, b=b)
    gen = torch.Generator().manual_seed(0)
    plain_B, plain_A = lego_merge(units, 1, LegoConfig(k=1, parameter_reweight=False), gen)
    fixed_B, fixed_A = lego_merge(units, 1, LegoConfig(k=1, parameter_reweight=True), gen)
    torch.testing.assert_close(plain_A[0], (a[0] + a[1]) / 2)
    assert float(plain_A.norm()) < 0.95  # norm decay of the average
    torch.testing.assert_close(float(fixed_A.norm()), 1.0)
    torch.testing.assert_close(fixed_A[0] / fixed_A.norm(), plain_A[0] / plain_A.norm())
    torch.testing.assert_close(float(fixed_B.norm()), 1.0)


def test_output_reweighting_matches_the_mean_input_norm(three_adapters):
    weights = [1.0, 0.5, 2.0]
    result = merge(adapters=three_adapters, weights=weights, method="lora_lego", parameters={"k": 3})
    scaled = merge(adapters=three_adapters, weights=weights, method="lora_lego", parameters={"k": 3, "gamma": 0.5})
    for module, half in zip(result.modules, scaled.modules, strict=True):
        norms = []
        for path, w in zip(three_adapters, weights, strict=True):
            adapter = load_adapter(path)
            # an adapter without the module is a zero task vector there: norm 0 in the mean
            norms.append(float((w * adapter.factors(module.name).delta()).norm()) if module.name in adapter.modules
                         else 0.0)
        merged = float((module.B @ module.A).norm())
        assert math.isclose(merged, sum(norms) / len(norms), rel_tol=1e-4)
        assert math.isclose(float((half.B @ half.A).norm()), merged / 2, rel_tol=1e-4)


def test_default_rank_is_the_largest_input_rank_with_heterogeneous_ranks(three_adapters):
    result = merge(adapters=three_adapters, method="lora_lego")
    ranks = {m.name.split(".", 3)[-1]: m.rank for m in result.modules if ".layers.0." in m.name}
    assert ranks == {"self_attn.q_proj": 8, "self_attn.v_proj": 6, "self_attn.o_proj": 8, "mlp.down_proj": 8}


def test_kmeans_is_seeded_and_deterministic(three_adapters):
    params = {"k": 5, "feature": "raw"}
    first = merge(adapters=three_adapters, method="lora_lego", parameters=params, seed=1)
    again = merge(adapters=three_adapters, method="lora_lego", parameters=params, seed=1)
    for m1, m2 in zip(first.modules, again.modules, strict=True):
        assert torch.equal(m1.A, m2.A) and torch.equal(m1.B, m2.B)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fits = [kmeans(x, 4, generator=torch.Generator().manual_seed(s), n_init=2) for s in (5, 5)]
    assert torch.equal(fits[0].labels, fits[1].labels) and torch.equal(fits[0].signs, fits[1].signs)
    assert sorted(torch.bincount(fits[0].labels).tolist())[0] >= 1  # no empty cluster


def test_kmeans_separates_planted_sign_invariant_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 8, dtype=torch.float64)
    pts = centres.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 8, generator=gen, dtype=torch.float64)
    signs = torch.where(torch.rand(15, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    fit = kmeans(pts * signs[:, None], 3, generator=torch.Generator().manual_seed(0), n_init=3)
    groups = {tuple(sorted((fit.labels == c).nonzero().flatten().tolist())) for c in range(3)}
    assert groups == {tuple(range(0, 5)), tuple(range(5, 10)), tuple(range(10, 15))}
    for c in range(3):
        members = (fit.labels == c)
        aligned = (pts * signs[:, None] * fit.signs[:, None])[members]
        assert float(aligned.mean(0).norm()) > 0.95  # no cancellation inside a cluster


def test_canonicalize_keeps_products_and_balances_norms():
    gen = torch.Generator().manual_seed(2)
    units = Units(a=torch.randn(6, 10, generator=gen, dtype=torch.float64) * 5,
                  b=torch.randn(6, 7, generator=gen, dtype=torch.float64) / 5)
    canon = canonicalize(units)
    for j in range(6):
        torch.testing.assert_close(torch.outer(canon.b[j], canon.a[j]), torch.outer(units.b[j], units.a[j]))
    torch.testing.assert_close(canon.a.norm(dim=1), canon.b.norm(dim=1))
    flipped = canonicalize(Units(a=-units.a * 3, b=-units.b / 3))
    torch.testing.assert_close(flipped.a, canon.a)
    torch.testing.assert_close(flipped.b, canon.b)


def test_shrink_one_adapter_and_load_it_in_peft(adapter_factory, llama, tmp_path):
    path = adapter_factory(seed=41, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    exact = shrink_adapter(path, 8, **EXACT)
    original = load_adapter(path)
    for module in exact.modules:
        torch.testing.assert_close(module.B @ module.A, original.factors(module.name).delta(), rtol=1e-5, atol=1e-6)
    result = shrink_adapter(path, 3, tmp_path / "shrunk")
    saved = load_adapter(tmp_path / "shrunk")
    assert {info.rank for info in saved.modules.values()} == {3}
    deltas = {name: saved.factors(name).delta() for name in saved.modules}
    for module in result.modules:
        torch.testing.assert_close(deltas[module.name], module.B @ module.A)
    assert_peft_forward(llama, tmp_path / "shrunk", deltas)


def test_registry_and_bad_parameters(three_adapters):
    method = get_method("lora_lego")
    assert method is get_method("lego") and not method.exact and method.kind == "factored"
    with pytest.raises(RecipeError, match="k"):
        merge(adapters=three_adapters, method="lora_lego", parameters={"k": 0})
    with pytest.raises(RecipeError, match="did you mean"):
        merge(adapters=three_adapters, method="lora_lego", parameters={"parameter_reweighting": True})
