"""Factored linear algebra on sums of low-rank products, and applying the rank policy (core/rank.py).

A weighted sum of LoRAs is one LoRA with concatenated factors (exact). Its
truncated SVD comes from a thin QR of ``B_cat`` and of ``A_cat^T`` plus an
R x R SVD: O((d_in + d_out) R^2), never a d_out x d_in matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.core.adapter import LoraFactors
from loramerge.core.rank import RankPolicy

# Singular values below this fraction of the largest are numerical zeros.
DEFAULT_RTOL = 1e-6


def concat_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_t w_t B_t A_t`` as one LoRA: ``B_cat = [w_1 B_1 | ...]``, ``A_cat = [A_1; ...]`` (exact)."""
    if len(factors) != len(weights):
        raise ValueError("one weight per adapter")
    B_cat = torch.cat([w * f.B for f, w in zip(factors, weights)], dim=1)
    A_cat = torch.cat([f.A for f in factors], dim=0)
    return B_cat, A_cat


def _work_dtype(R: int, dtype: torch.dtype) -> torch.dtype:
    """float64 for large total ranks (conditioning) or float64 inputs, float32 otherwise."""
    return torch.float64 if R > 256 or dtype == torch.float64 else torch.float32


def factored_svd(B: torch.Tensor, A: torch.Tensor, rtol: float = DEFAULT_RTOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B @ A`` without forming it: returns U (d_out x k), S (k), Vh (k x d_in).

    Singular values below ``rtol * S[0]`` are dropped (numerical rank).
    """
    out_dtype = B.dtype
    work = _work_dtype(B.shape[1], B.dtype)
    Q_B, R_B = torch.linalg.qr(B.to(work), mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.T.to(work), mode="reduced")
    core = (R_B.double() @ R_A.double().T)
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    U = Q_B @ U_c[:, :keep].to(work)
    V = Q_A @ Vh_c[:keep].T.to(work)
    return U.to(out_dtype), S[:keep].to(out_dtype), V.T.to(out_dtype)


def _rank_for(policy: RankPolicy, S: torch.Tensor, input_ranks: Sequence[int], total_sq: float, dense: bool) -> int:
    n = S.numel()
    if policy.kind == "fixed":
        return min(policy.k, n)  # type: ignore[arg-type]
    if policy.kind == "max":
        return min(max(input_ranks), n)
    if policy.kind == "auto" and dense:
        return min(sum(input_ranks), n)
    if policy.kind == "energy":
        if total_sq <= 0:
            return 0
        cum = torch.cumsum(S.double() ** 2, 0) / total_sq
        hit = (cum >= policy.energy - 1e-12).nonzero()
        return int(hit[0]) + 1 if hit.numel() else n
    return n


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance the singular values between the factors: B = U sqrt(S), A = sqrt(S) Vh."""
    root = S.sqrt()
    return U * root, root[:, None] * Vh


@dataclass(frozen=True)
class Compressed:
    """A merged module brought back to LoRA form, with what the truncation cost."""

    B: torch.Tensor
    A: torch.Tensor
    rel_error: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def compress_factored(B: torch.Tensor, A: torch.Tensor, policy: RankPolicy, input_ranks: Sequence[int]) -> Compressed:
    """Apply the rank policy to a factored result ``B @ A`` (QR + small SVD)."""
    R = A.shape[0]
    min_dim = min(B.shape[0], A.shape[1])
    if policy.kind in ("auto", "exact") and R <= min_dim:
        return Compressed(B=B, A=A, rel_error=0.0)
    if policy.kind == "fixed" and R <= policy.k and R <= min_dim:  # type: ignore[operator]
        return Compressed(B=B, A=A, rel_error=0.0)
    U, S, Vh = factored_svd(B, A)
    total_sq = float((S.double() ** 2).sum())
    k = _rank_for(policy, S, input_ranks, total_sq, dense=False)
    k = max(k, 1)
    lost = float((S[k:].double() ** 2).sum())
    rel = math.sqrt(lost / total_sq) if total_sq > 0 else 0.0
    if S.numel() == 0:  # an all-zero delta: keep one zero unit so PEFT has a module
        return Compressed(B=B.new_zeros(B.shape[0], 1), A=A.new_zeros(1, A.shape[1]), rel_error=0.0)
    Bk, Ak = _split(U[:, :k], S[:k], Vh[:k])
    return Compressed(B=Bk, A=Ak, rel_error=rel)


def randomized_svd(
    M: torch.Tensor, q: int, *, n_iter: int = 4, generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-q SVD of a dense matrix by a randomized range finder with power iterations (Halko et al.).

    Costs O(d_out d_in q) per pass; used to bring element-wise results back to low rank without a full SVD.
    ``start`` (d_in x s, s <= q) replaces the first s columns of the random sketch (a warm start).
    Deterministic for a given generator.
    """
    d_out, d_in = M.shape
    if q >= min(d_out, d_in):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, S, Vh
    omega = torch.randn(d_in, q, generator=generator, dtype=M.dtype, device=M.device)
    if start is not None:
        s = min(start.shape[1], q)
        omega[:, :s] = start[:, :s].to(M.dtype)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    small = Q.T @ M  # q x d_in
    U_s, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ U_s, S, Vh


def compress_dense(
    delta: torch.Tensor, policy: RankPolicy, input_ranks: Sequence[int], *, seed: int = 0, oversample: int = 16,
    basis: torch.Tensor | None = None,
) -> Compressed:
    """Bring a dense (element-wise) result back to LoRA form under the rank policy.

    ``exact`` stores the delta losslessly at rank min(d_out, d_in) (identity on the short side),
    other policies use a randomized SVD: started from ``basis`` (the inputs' row space) when given, with one
    power iteration (closer to the optimum than a random start with four, at under half the cost), else
    from a random sketch with four. The relative error is exact: the kept part is an orthogonal projection of
    the delta, so the lost energy is ``||delta||^2 - sum(S_k^2)``; when that is tiny (under 1e-4 of the total,
    where the subtraction would lose digits) the residual is summed block by block instead.
    """
    d_out, d_in = delta.shape
    total_sq = _sum_of_squares(delta)
    if policy.kind == "exact":
        if d_out <= d_in:
            return Compressed(B=torch.eye(d_out, dtype=delta.dtype, device=delta.device), A=delta.clone(), rel_error=0.0)
        return Compressed(B=delta.clone(), A=torch.eye(d_in, dtype=delta.dtype, device=delta.device), rel_error=0.0)
    if total_sq == 0.0:
        return Compressed(B=delta.new_zeros(d_out, 1), A=delta.new_zeros(1, d_in), rel_error=0.0)
    gen = torch.Generator(device=delta.device).manual_seed(seed)
    n_iter = 4 if basis is None else 1
    min_dim = min(d_out, d_in)
    if policy.kind == "fixed":
        target = policy.k
    elif policy.kind == "max":
        target = max(input_ranks)
    elif policy.kind == "auto":
        target = sum(input_ranks)
    else:
        target = None
    if target is not None:
        target = min(target, min_dim)
        U, S, Vh = randomized_svd(delta, min(target + oversample, min_dim), generator=gen, n_iter=n_iter, start=basis)
        k = target
    else:  # energy: grow the sketch until the kept energy is reached
        q = min(max(2 * sum(input_ranks), 32), min_dim)
        while True:
            U, S, Vh = randomized_svd(delta, q, generator=gen, n_iter=n_iter, start=basis)
            k = _rank_for(policy, S, input_ranks, total_sq, dense=True)
            reached = float((S[:k].double() ** 2).sum()) >= (policy.energy - 1e-9) * total_sq  # type: ignore[operator]
            if reached or q >= min_dim:
                break
            q = min(2 * q, min_dim)
    k = max(min(k, S.numel()), 1)
    Bk, Ak = _split(U[:, :k], S[:k], Vh[:k])
    lost = total_sq - float((S[:k].double() ** 2).sum())
    if lost < 1e-4 * total_sq:
        lost = _residual_sum_of_squares(delta, Bk, Ak)
    return Compressed(B=Bk, A=Ak, rel_error=math.sqrt(max(lost, 0.0) / total_sq))


def _residual_sum_of_squares(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """``sum((delta - B @ A)^2)`` in float64, a block of rows at a time (never a second d_out x d_in matrix)."""
    rows = max(1, _CHUNK // max(delta.shape[1], 1))
    total = 0.0
    for start in range(0, delta.shape[0], rows):
        block = delta[start:start + rows] - B[start:start + rows] @ A
        total += float(block.double().square_().sum())
    return total


_CHUNK = 1 << 18


def _sum_of_squares(x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """``sum((x - minus)^2)`` in float64, chunk by chunk: no float64 copy of the whole module."""
    flat = x.reshape(-1)
    other = minus.reshape(-1) if minus is not None else None
    total = 0.0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if other is not None:
            chunk = chunk - other[start:start + _CHUNK]  # in x's dtype, as ``x - minus`` would be
        total += float(chunk.double().square_().sum())
    return total


def frobenius_inner(f: LoraFactors, g: LoraFactors) -> float:
    """``<B_f A_f, B_g A_g>_F`` from the factors: trace((B_f^T B_g)(A_g A_f^T))."""
    return float(((f.B.T @ g.B) * (f.A @ g.A.T)).sum())


def frobenius_norm(f: LoraFactors) -> float:
    return math.sqrt(max(frobenius_inner(f, f), 0.0))
