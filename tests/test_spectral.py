"""Oracles for the spectral and subspace merges (TSV-M, Iso-C, Iso-CTS, STAR, KnOTS).

Each method is compared with an independent dense implementation written here from the
papers (full SVDs of d_out x d_in matrices in float64), and with the spectra the papers define.
"""

from __future__ import annotations

import copy

import pytest
import torch

import loramerge
from loramerge.core.adapter import LoraFactors
from loramerge.core.ops import bernoulli_mask, generator_for, topk_threshold
from loramerge.errors import LoramergeError, RecipeError
from loramerge.merging.methods import ModuleInputs, get_method
from loramerge.merging.methods.knots import KnotsConfig, global_topk_thresholds, joint_basis, knots
from loramerge.merging.methods.spectral import (
    IsoCConfig,
    IsoCtsConfig,
    StarConfig,
    TsvConfig,
    iso_c,
    iso_cts,
    star,
    star_truncate,
    svd_of,
    tsv,
)

NUMERICAL_ZERO = 1e-6  # float32 deltas carry noise singular values ~1e-8 of the largest


# --- inputs ---------------------------------------------------------------------------------------------------------


def make_inputs(d_out=24, d_in=20, ranks=(3, 4, 5), weights=(1.0, 0.7, -0.5), seed=0, name="layer.q_proj",
                names=None) -> ModuleInputs:
    gen = torch.Generator().manual_seed(seed)
    factors = tuple(
        LoraFactors(A=torch.randn(r, d_in, generator=gen) / d_in**0.5, B=torch.randn(d_out, r, generator=gen))
        for r in ranks
    )
    return ModuleInputs(name=name, factors=factors, weights=tuple(weights),
                        adapter_names=tuple(names or (f"task{i}" for i in range(len(ranks)))), seed=7)


def deltas(inputs: ModuleInputs) -> list[torch.Tensor]:
    return [w * (f.B.double() @ f.A.double()) for f, w in inputs.weighted()]


def product(result) -> torch.Tensor:
    return result.B.double() @ result.A.double()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1.0)


# --- dense references (from the papers, full SVDs) --------------------------------------------------------------


def dense_svd(M: torch.Tensor, floor: float = 0.0):
    """Full SVD of a dense matrix, without the numerical zeros (and values <= floor)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = int(((S > NUMERICAL_ZERO * S[0]) & (S > floor)).sum())
    return U[:, :keep], S[:keep], Vh[:keep]


def procrustes(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def ref_tsv(ds, k, lam=1.0):
    parts = [dense_svd(d) for d in ds]
    U = torch.cat([p[0][:, :k] for p in parts], dim=1)
    S = torch.cat([p[1][:k] for p in parts])
    V = torch.cat([p[2][:k].T for p in parts], dim=1)
    return lam * procrustes(U) @ torch.diag(S) @ procrustes(V).T


def ref_iso_c(ds, rtol=1e-3, lam=1.0):
    M = sum(ds)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, S, Vh = dense_svd(M, floor=rtol * float(S[0]))
    return lam * S.mean() * U @ Vh


def ref_iso_cts(ds, K, f=0.8, rtol=1e-3, lam=1.0):
    T = len(ds)
    common = int(K * f)
    task_total = round((K - common) / T) * T
    common, per_task = K - task_total, task_total // T
    M = sum(ds)
    floor = rtol * float(torch.linalg.svdvals(M)[0])
    U, S, Vh = dense_svd(M, floor=floor)
    Uc, Sc, Vc = U[:, :common], S[:common], Vh[:common]
    Us, Ss, Vs = [Uc], [Sc], [Vc.T]
    for d in ds:
        if per_task == 0:
            break
        u, s, vh = dense_svd(d - Uc @ Uc.T @ d, floor=floor)
        Us.append(u[:, :per_task])
        Ss.append(s[:per_task])
        Vs.append(vh[:per_task].T)
    S_all = torch.cat(Ss)
    return lam * S_all.mean() * procrustes(torch.cat(Us, dim=1)) @ procrustes(torch.cat(Vs, dim=1)).T


def ref_star_one(d, eta):
    """IBM/STAR's per-matrix rule: smallest k with cumsum >= eta% of the nuclear norm, rescale to the full norm."""
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    total = S.sum()
    k = int(torch.searchsorted(torch.cumsum(S, 0), total * eta / 100)) + 1
    kept = S[:k] * total / S[:k].sum()
    return U[:, :k] @ torch.diag(kept) @ Vh[:k]


def ref_star(ds, weights, eta=40.0, lam=1.0):
    return lam * sum(ref_star_one(d, eta) for d in ds if d.any()) / sum(weights)  # a zero task vector adds 0


def ref_joint_coordinates(ds):
    """KnOTS: the dense SVD of [dW_1 | ... | dW_T] and each task's coordinates S V_t^T."""
    U, S, Vh = dense_svd(torch.cat(ds, dim=1), floor=0.0)
    keep = int((S > 1e-6 * S[0]).sum())
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    d_in = ds[0].shape[1]
    return U, [S[:, None] * Vh[:, t * d_in:(t + 1) * d_in] for t in range(len(ds))]


def ref_kth_largest(values: torch.Tensor, density: float) -> float | None:
    flat = values.abs().reshape(-1)
    k = int(density * flat.numel())
    return None if k >= flat.numel() else float(flat.sort(descending=True).values[k - 1])


def ref_disjoint_mean(zs):
    mass = sum(zs)
    majority = 1.0 if float(mass.sum()) >= 0 else -1.0
    sign = torch.where(mass == 0, majority, torch.sign(mass))
    agree = [(z != 0) & (torch.sign(z) == sign) for z in zs]
    total = sum(torch.where(a, z, 0.0) for a, z in zip(agree, zs, strict=True))
    count = sum(a.double() for a in agree)
    return total / count.clamp(min=1.0)


def ref_knots(ds, merge, density=None, lam=1.0, thresholds=None, seed=7, module="layer.q_proj", names=None):
    U, zs = ref_joint_coordinates(ds)
    names = names or [f"task{i}" for i in range(len(ds))]
    if merge in ("ties",):
        trimmed = []
        for z, name in zip(zs, names, strict=True):
            thr = thresholds[name] if thresholds is not None else ref_kth_largest(z, density)
            trimmed.append(z if thr is None else torch.where(z.abs() >= thr, z, 0.0))
        merged = ref_disjoint_mean(trimmed)
    elif merge in ("dare_ties", "dare_linear"):
        dropped = []
        for z, name in zip(zs, names, strict=True):  # the same seeded masks as the library (one per module and task)
            mask = bernoulli_mask(z.shape, density, generator_for(seed, "knots-dare", module, name))
            dropped.append(torch.where(mask, z / density, 0.0))
        merged = ref_disjoint_mean(dropped) if merge == "dare_ties" else sum(dropped)
    else:
        merged = sum(zs)
    return U @ (lam * merged)


# --- KnOTS ----------------------------------------------------------------------------------------------------------


def test_knots_factored_alignment_equals_dense_joint_svd():
    inputs = make_inputs()
    ds = deltas(inputs)
    basis = joint_basis(inputs.factors, inputs.weights)
    U, S, Vh = torch.linalg.svd(torch.cat(ds, dim=1), full_matrices=False)
    k = basis.rank
    assert k == sum(inputs.ranks)
    assert torch.allclose(basis.S.double(), S[:k], rtol=1e-5)
    signs = torch.sign((basis.U.double() * U[:, :k]).sum(0))
    assert torch.allclose(basis.U.double() * signs, U[:, :k], atol=1e-5)
    d_in = ds[0].shape[1]
    for t, d in enumerate(ds):
        assert torch.allclose(basis.right_block(t).double() * signs[:, None], Vh[:k, t * d_in:(t + 1) * d_in], atol=1e-5)
        assert close(basis.U.double() @ basis.coordinates(t).double(), d)


def test_knots_linear_lambda_one_is_the_plain_sum():
    inputs = make_inputs()
    out = knots(KnotsConfig(merge="linear"), inputs)
    assert close(product(out), sum(deltas(inputs)))


@pytest.mark.parametrize(("merge", "density"), [("ties", 0.3), ("dare_ties", 0.6), ("dare_linear", 0.6)])
def test_knots_merges_equal_dense_reference(merge, density):
    inputs = make_inputs(seed=3)
    params = {"merge": merge, "density": density, "lambda": 0.6} | ({"trim_scope": "module"} if merge == "ties" else {})
    cfg = KnotsConfig(**params)
    out = knots(cfg, inputs)
    assert close(product(out), ref_knots(deltas(inputs), merge, density, lam=0.6), 1e-4)


def test_knots_global_trim_uses_model_wide_thresholds():
    first = make_inputs(seed=4, name="m1", names=["a", "b", "c"])
    second = make_inputs(d_out=16, d_in=28, ranks=(5, 2), weights=(0.9, 1.2), seed=5, name="m2", names=["a", "c"])
    cfg = KnotsConfig(merge="ties", density=0.25, trim_scope="global")
    thresholds = get_method("knots").prepare(cfg, lambda: iter([first, second]))
    coords = {"m1": ref_joint_coordinates(deltas(first))[1], "m2": ref_joint_coordinates(deltas(second))[1]}
    pooled = {"a": [coords["m1"][0], coords["m2"][0]], "b": [coords["m1"][1]], "c": [coords["m1"][2], coords["m2"][1]]}
    expected = {name: ref_kth_largest(torch.cat([z.reshape(-1) for z in zs]), 0.25) for name, zs in pooled.items()}
    assert thresholds.keys() == expected.keys()
    for name in expected:
        assert thresholds[name] == pytest.approx(expected[name], rel=1e-4)
    for inputs in (first, second):
        ctx = ModuleInputs(**{**vars(inputs), "context": thresholds})
        out = knots(cfg, ctx)
        ref = ref_knots(deltas(inputs), "ties", thresholds=expected, names=list(inputs.adapter_names))
        assert close(product(out), ref, 1e-4)
    per_module = knots(KnotsConfig(merge="ties", density=0.25, trim_scope="module"), first)
    assert not close(product(per_module), product(knots(cfg, ModuleInputs(**{**vars(first), "context": thresholds}))))


def test_global_topk_thresholds_equal_topk_on_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(50, 7, generator=gen), torch.zeros(3, 3), torch.randn(11, generator=gen).round()]
    b = [torch.randn(9, 9, generator=gen) * 1e-3, torch.full((4,), 2.5)]
    items = [("a", x) for x in a] + [("b", x) for x in b]
    for density in (0.01, 0.2, 0.5, 0.97, 1.0):
        got = global_topk_thresholds(density, lambda: iter(items))
        for key, xs in (("a", a), ("b", b)):
            assert got[key] == topk_threshold(torch.cat([x.reshape(-1) for x in xs]), density)


def test_knots_global_trim_needs_the_prepare_pass():
    with pytest.raises(ValueError, match="prepare"):
        knots(KnotsConfig(merge="ties", trim_scope="global"), make_inputs())


# --- TSV-M ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_per_task", [None, 2])
def test_tsv_spectrum_is_the_kept_singular_values_and_matches_dense(k_per_task):
    inputs = make_inputs(d_out=30, d_in=26)
    ds = deltas(inputs)
    out = tsv(TsvConfig(k_per_task=k_per_task), inputs)
    budget = k_per_task or min(30, 26) // 3
    kept = torch.cat([torch.linalg.svdvals(d)[:min(budget, r)] for d, r in zip(ds, inputs.ranks, strict=True)])
    spectrum = torch.linalg.svdvals(product(out))[: kept.numel()]
    assert torch.allclose(spectrum, kept.sort(descending=True).values, rtol=1e-4)
    assert close(product(out), ref_tsv(ds, budget), 1e-4)


def test_tsv_of_one_task_is_that_task():
    inputs = make_inputs(ranks=(4,), weights=(0.8,))
    assert close(product(tsv(TsvConfig(**{"lambda": 1.0}), inputs)), deltas(inputs)[0], 1e-5)


# --- Iso-C and Iso-CTS ----------------------------------------------------------------------------------------------


def test_iso_c_flat_spectrum_in_the_span_of_the_sum():
    inputs = make_inputs()
    ds = deltas(inputs)
    out = product(iso_c(IsoCConfig(), inputs))
    U, S, Vh = dense_svd(sum(ds))
    spectrum = torch.linalg.svdvals(out)
    assert torch.allclose(spectrum[: S.numel()], torch.full_like(S, float(S.mean())), rtol=1e-5)
    assert float(spectrum[S.numel():].abs().max()) < 1e-5 * float(S.mean())
    assert float((out - U @ (U.T @ out)).norm()) < 1e-5 * float(out.norm())
    assert float((out - (out @ Vh.T) @ Vh).norm()) < 1e-5 * float(out.norm())
    assert close(out, ref_iso_c(ds), 1e-5)
    naive_mean = torch.linalg.svdvals(sum(ds)).mean()  # the full-spectrum form averages over numerical zeros
    assert float(S.mean()) > 1.2 * float(naive_mean)


def test_iso_c_drops_tiny_directions_before_flattening():
    inputs = make_inputs(ranks=(3, 3), weights=(1.0, 1e-5))
    out = product(iso_c(IsoCConfig(spectrum_rtol=1e-3), inputs))
    assert int((torch.linalg.svdvals(out) > 1e-6 * float(out.norm())).sum()) == 3
    assert close(out, ref_iso_c(deltas(inputs), rtol=1e-3), 1e-5)


def test_iso_cts_structure_and_dense_reference():
    inputs = make_inputs(d_out=40, d_in=36, ranks=(4, 6, 5))
    ds = deltas(inputs)
    K = 15
    out = product(iso_cts(IsoCtsConfig(rank=K, **{"lambda": 1.5}), inputs))
    common, per_task = 12, 1  # K = 15, f = 0.8: 12 common dims, (15 - 12) / 3 = 1 per task
    spectrum = torch.linalg.svdvals(out)
    rank = int((spectrum > 1e-6 * spectrum[0]).sum())
    assert rank == common + 3 * per_task
    assert torch.allclose(spectrum[:rank], spectrum[0].expand(rank), rtol=1e-5)  # flat
    U, S, _ = dense_svd(sum(ds))
    Uc = U[:, :common]
    U_out = torch.linalg.svd(out, full_matrices=False)[0][:, :rank]
    assert float((Uc - U_out @ (U_out.T @ Uc)).norm()) < 1e-5  # the common subspace is kept
    stacked = [S[:common]] + [dense_svd(d - Uc @ Uc.T @ d)[1][:per_task] for d in ds]
    assert float(spectrum[0]) == pytest.approx(1.5 * float(torch.cat(stacked).mean()), rel=1e-5)
    assert close(out, ref_iso_cts(ds, K, lam=1.5), 1e-4)


def test_iso_cts_default_rank_and_full_common_fraction():
    inputs = make_inputs(d_out=40, d_in=36)
    ds = deltas(inputs)
    assert close(product(iso_cts(IsoCtsConfig(), inputs)), ref_iso_cts(ds, sum(inputs.ranks)), 1e-4)
    only_common = product(iso_cts(IsoCtsConfig(common_fraction=1.0), inputs))
    assert close(only_common, product(iso_c(IsoCConfig(), inputs)), 1e-5)


# --- STAR -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [10.0, 40.0, 75.0])
def test_star_keeps_each_task_nuclear_norm(eta):
    inputs = make_inputs(ranks=(8, 6))
    for f, w in inputs.weighted():
        task = svd_of(w * f.B, f.A)
        truncated = star_truncate(task, eta)
        S = task.S.double()
        k = truncated.S.numel()
        assert float(truncated.S.sum()) == pytest.approx(float(S.sum()), rel=1e-6)
        assert float(S[:k].sum()) >= eta / 100 * float(S.sum()) - 1e-9
        assert k == 1 or float(S[:k - 1].sum()) < eta / 100 * float(S.sum())
        dense = ref_star_one(w * (f.B.double() @ f.A.double()), eta)
        assert float(torch.linalg.matrix_norm(dense, "nuc")) == pytest.approx(float(S.sum()), rel=1e-5)


def test_star_equals_dense_reference_and_eta_100_is_the_average():
    inputs = make_inputs(ranks=(8, 6, 5), weights=(1.0, 0.5, 0.7))
    ds = deltas(inputs)
    assert close(product(star(StarConfig(), inputs)), ref_star(ds, inputs.weights), 1e-4)
    assert close(product(star(StarConfig(eta=100), inputs)), sum(ds) / sum(inputs.weights), 1e-5)
    unnormalised = product(star(StarConfig(eta=30, normalize=False), inputs))
    assert close(unnormalised, ref_star(ds, [1.0], eta=30), 1e-4)


# --- through loramerge.merge, and PEFT --------------------------------------------------------------------------


def _peft_deltas(base, paths) -> list[dict[str, torch.Tensor]]:
    """Each input adapter's per-module delta as PEFT computes it (scale, layout)."""
    from peft import PeftModel

    out = []
    for path in paths:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
        found = {}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                found[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
        out.append(found)
    return out


def _reference_merge(method: str, per_adapter: list[dict], weights, names) -> dict[str, torch.Tensor]:
    """The dense reference of ``method`` on every module; an adapter without a module is a zero task vector there."""
    modules = sorted({m for d in per_adapter for m in d})
    shapes = {m: next(d[m] for d in per_adapter if m in d) for m in modules}
    ds = {m: [weights[i] * per_adapter[i].get(m, torch.zeros_like(shapes[m])) for i in range(len(per_adapter))]
          for m in modules}
    present = {m: list(range(len(per_adapter))) for m in modules}  # zero task vectors take part (zero coordinates)
    if method == "knots":  # global TIES trim (the default, density 0.2): thresholds over every module's coordinates
        coords = {m: ref_joint_coordinates(ds[m])[1] for m in modules}
        pooled = {n: torch.cat([coords[m][j].reshape(-1) for m in modules for j, i in enumerate(present[m])
                                if names[i] == n]) for n in names}
        thresholds = {n: ref_kth_largest(v, 0.2) for n, v in pooled.items()}
        return {m: ref_knots(ds[m], "ties", thresholds=thresholds, names=[names[i] for i in present[m]])
                for m in modules}
    out = {}
    for m in modules:
        d, idx = ds[m], present[m]
        if method == "tsv":
            out[m] = ref_tsv(d, min(d[0].shape) // len(d))
        elif method == "iso_c":
            out[m] = ref_iso_c(d)
        elif method == "iso_cts":
            out[m] = ref_iso_cts(d, min(sum(_RANKS[i] for i in idx if m in per_adapter[i]), *d[0].shape))
        else:
            out[m] = ref_star(d, list(weights))
    return out


_RANKS = (4, 6, 8)  # the ranks of the conftest's three_adapters
_WEIGHTS = (1.0, 0.6, 0.8)


@pytest.fixture(scope="module")
def peft_deltas(llama, three_adapters):
    return _peft_deltas(llama, three_adapters)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star", "knots"])
def test_merge_driver_matches_dense_reference(method, three_adapters, peft_deltas):
    result = loramerge.merge(adapters=three_adapters, method=method, weights=list(_WEIGHTS))
    names = [a.name for a in result.adapters]
    expected = _reference_merge(method, peft_deltas, _WEIGHTS, names)
    got = {name: f.delta().double() for name, f in result.factors().items()}
    assert got.keys() == expected.keys()
    # The reference starts from PEFT's float32 deltas; choosing a subspace (Iso-CTS) amplifies their
    # ~1e-7 rounding by 1 / (relative singular-value gap), hence a looser bound than the unit oracles above.
    for name in expected:
        assert close(got[name], expected[name], 5e-4), name


@pytest.mark.parametrize("method", ["iso_cts", "knots"])
def test_saved_output_loads_in_peft_and_forward_matches(method, llama, three_adapters, peft_deltas, tmp_path):
    from peft import PeftModel

    out_dir = tmp_path / method
    result = loramerge.merge(adapters=three_adapters, method=method, weights=list(_WEIGHTS), output=out_dir)
    expected = _reference_merge(method, peft_deltas, _WEIGHTS, [a.name for a in result.adapters])
    reference = copy.deepcopy(llama)
    with torch.no_grad():
        for name, delta in expected.items():
            reference.get_submodule(name).weight += delta.float()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(out_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 64]])
    with torch.no_grad():
        want = reference(ids).logits
        got = peft_model(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


# --- bad parameters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        ("knots", {"merge": "bogus"}, "merge"),
        ("knots", {"density": 0.0}, "density"),
        ("knots", {"merge": "linear", "density": 0.5}, "density has no effect"),
        ("knots", {"merge": "dare_ties", "trim_scope": "module"}, "trim_scope applies to merge 'ties' only"),
        ("knots", {"trim_scope": "layer"}, "trim_scope"),
        ("star", {"eta": 0}, "eta"),
        ("star", {"eta": 150}, "eta"),
        ("iso_cts", {"common_fraction": 0.0}, "common_fraction"),
        ("iso_cts", {"rank": 0}, "rank"),
        ("iso_c", {"spectrum_rtol": 1.5}, "spectrum_rtol"),
        ("tsv", {"k_per_task": 0}, "k_per_task"),
        ("tsv", {"alpha": 1.0}, "unknown key 'alpha'"),
    ],
)
def test_bad_parameters_are_clear_errors(method, parameters, message, three_adapters):
    with pytest.raises(RecipeError, match=message):
        loramerge.merge(adapters=three_adapters, method=method, parameters=parameters)


def test_star_normalize_with_zero_weight_sum_names_the_module(three_adapters):
    with pytest.raises(LoramergeError, match="normalize: false") as info:
        loramerge.merge(adapters=three_adapters[:2], method="star", weights=[1.0, -1.0])
    assert info.value.module is not None
