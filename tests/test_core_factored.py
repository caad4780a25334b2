"""Factored algebra against dense oracles: concatenation, QR + small SVD, rank policies."""

from __future__ import annotations

import pytest
import torch

from loramerge.core.adapter import LoraFactors
from loramerge.core.factored import (
    RankPolicy,
    compress_dense,
    compress_factored,
    concat_factors,
    factored_svd,
    frobenius_inner,
)


def random_factors(d_out: int, d_in: int, r: int, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g))


@pytest.fixture
def factors():
    return [random_factors(48, 40, r, seed) for r, seed in ((3, 1), (5, 2), (4, 3))]


def test_concatenation_equals_dense_weighted_sum(factors):
    weights = [0.7, -0.2, 1.3]
    B, A = concat_factors(factors, weights)
    dense = sum(w * f.B @ f.A for f, w in zip(factors, weights))
    assert B.shape == (48, 12) and A.shape == (12, 40)
    torch.testing.assert_close(B @ A, dense, rtol=1e-5, atol=1e-5)


def test_factored_svd_matches_dense_svd(factors):
    B, A = concat_factors(factors, [1.0, 0.5, 2.0])
    U, S, Vh = factored_svd(B, A)
    dense = (B @ A).double()
    S_dense = torch.linalg.svdvals(dense)
    assert S.numel() == 12
    torch.testing.assert_close(S.double(), S_dense[:12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((U * S) @ Vh, B @ A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U.T @ U, torch.eye(12), rtol=0, atol=1e-4)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(12), rtol=0, atol=1e-4)


def test_factored_svd_drops_numerical_zeros():
    f = random_factors(30, 20, 3, 7)
    B = torch.cat([f.B, f.B], dim=1)  # the same directions twice: numerical rank 3
    A = torch.cat([f.A, f.A], dim=0)
    _, S, _ = factored_svd(B, A)
    assert S.numel() == 3


@pytest.mark.parametrize("k", [1, 4, 9])
def test_fixed_rank_reaches_the_best_rank_k_error(factors, k):
    """Eckart-Young: the truncated SVD is the best rank-k approximation."""
    B, A = concat_factors(factors, [1.0, 1.0, 1.0])
    out = compress_factored(B, A, RankPolicy("fixed", k=k), [3, 5, 4])
    dense = (B @ A).double()
    S = torch.linalg.svdvals(dense)
    best = (S[k:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt()
    approx = out.B.double() @ out.A.double()
    measured = torch.linalg.norm(dense - approx) / torch.linalg.norm(dense)
    assert out.rank == k
    assert abs(out.rel_error - float(best)) < 1e-5
    assert abs(float(measured) - float(best)) < 1e-4


def test_exact_policy_keeps_the_concatenation(factors):
    B, A = concat_factors(factors, [1.0, 1.0, 1.0])
    out = compress_factored(B, A, RankPolicy("exact"), [3, 5, 4])
    assert out.rank == 12 and out.rel_error == 0.0
    torch.testing.assert_close(out.B @ out.A, B @ A)


def test_exact_policy_caps_rank_at_the_matrix_size_losslessly():
    fs = [random_factors(6, 5, 4, s) for s in range(3)]  # total rank 12 > min(6, 5)
    B, A = concat_factors(fs, [1.0] * 3)
    out = compress_factored(B, A, RankPolicy("exact"), [4, 4, 4])
    assert out.rank == 5
    torch.testing.assert_close(out.B @ out.A, B @ A, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_policy_keeps_the_requested_energy(factors, energy):
    B, A = concat_factors(factors, [1.0, 1.0, 1.0])
    out = compress_factored(B, A, RankPolicy("energy", energy=energy), [3, 5, 4])
    S = torch.linalg.svdvals((B @ A).double())
    cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    expected_k = int((cum < energy - 1e-12).sum()) + 1
    assert out.rank == expected_k
    assert out.rel_error <= (1 - energy) ** 0.5 + 1e-6


def test_max_policy_is_the_largest_input_rank(factors):
    B, A = concat_factors(factors, [1.0, 1.0, 1.0])
    assert compress_factored(B, A, RankPolicy("max"), [3, 5, 4]).rank == 5


def test_dense_compression_matches_the_dense_svd_error():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 6, generator=g) @ torch.randn(6, 80, generator=g)
    noisy = low + 0.01 * torch.randn(64, 80, generator=g)
    out = compress_dense(noisy, RankPolicy("fixed", k=6), [6])
    S = torch.linalg.svdvals(noisy.double())
    best = float((S[6:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
    assert out.rank == 6
    assert out.rel_error == pytest.approx(best, rel=1e-3, abs=1e-6)


def test_dense_exact_is_lossless_and_auto_uses_the_sum_of_ranks():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 30, generator=g)
    exact = compress_dense(delta, RankPolicy("exact"), [2, 3])
    torch.testing.assert_close(exact.B @ exact.A, delta)
    assert exact.rel_error == 0.0
    assert compress_dense(delta, RankPolicy("auto"), [2, 3]).rank == 5


def test_dense_energy_policy_grows_the_sketch_until_reached():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(100, 90, generator=g)  # flat spectrum: needs many components
    out = compress_dense(delta, RankPolicy("energy", energy=0.9), [2])
    S = torch.linalg.svdvals(delta.double())
    cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    assert out.rank == int((cum < 0.9).sum()) + 1
    assert out.rel_error <= 0.1 ** 0.5 + 1e-4


def test_frobenius_inner_from_factors(factors):
    f, g = factors[0], factors[1]
    assert frobenius_inner(f, g) == pytest.approx(float((f.delta() * g.delta()).sum()), rel=1e-4)


@pytest.mark.parametrize("value,expected", [
    ("exact", RankPolicy("exact")), (16, RankPolicy("fixed", k=16)), ("16", RankPolicy("fixed", k=16)),
    ({"energy": 0.99}, RankPolicy("energy", energy=0.99)), (None, RankPolicy("auto")), ("max", RankPolicy("max")),
])
def test_rank_policy_parsing(value, expected):
    assert RankPolicy.parse(value) == expected


@pytest.mark.parametrize("bad", ["bogus", 0, -3, {"energy": 1.5}, {"energie": 0.9}, True])
def test_rank_policy_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        RankPolicy.parse(bad)
