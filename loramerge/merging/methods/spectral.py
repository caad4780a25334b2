"""Spectral and subspace merges, all in factored space: TSV-M, Iso-C, Iso-CTS and STAR.

Every step works on singular triplets of low-rank deltas, obtained from the
factors by thin QR plus a small SVD (``factored_svd``), and on d x R stacks of
singular vectors; no d_out x d_in matrix is ever formed. User weights multiply
the task vectors first (``tau_t = w_t B_t A_t``), so with unit weights each
function is the paper's algorithm on one module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from loramerge.core.factored import DEFAULT_RTOL, concat_factors
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs


@dataclass(frozen=True)
class Triplets:
    """A thin SVD ``U diag(S) Vh`` (U: d_out x k, S: k, Vh: k x d_in), S descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def top(self, k: int) -> Triplets:
        return Triplets(self.U[:, :k], self.S[:k], self.Vh[:k])

    def above(self, threshold: float) -> Triplets:
        """Only the triplets whose singular value exceeds ``threshold``."""
        return self.top(int((self.S > threshold).sum()))


def svd_of(B: torch.Tensor, A: torch.Tensor, rtol: float = DEFAULT_RTOL, *, precise: bool = True) -> Triplets:
    """Thin SVD of ``B @ A`` from the factors (numerical zeros dropped), returned in float64.

    QR of B and of A^T plus an SVD of the small core in float64, as in ``factored_svd``.
    ``precise`` keeps the QRs in float64 too: Iso-CTS subtracts projections and
    TSV-M / Iso-CTS orthogonalise stacks of these vectors, where float32 loses digits.
    """
    work = torch.float64 if precise else torch.float32
    Q_B, R_B = torch.linalg.qr(B.to(work), mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.T.to(work), mode="reduced")
    U_c, S, Vh_c = torch.linalg.svd(R_B.double() @ R_A.double().T, full_matrices=False)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    U = Q_B @ U_c[:, :keep].to(work)
    Vh = (Q_A @ Vh_c[:keep].T.to(work)).T
    return Triplets(U.double(), S[:keep], Vh.double())


def task_svds(inputs: ModuleInputs) -> list[Triplets]:
    """The SVD of each weighted task vector ``w_t B_t A_t``."""
    return [svd_of(w * f.B, f.A) for f, w in inputs.weighted()]


def sum_svd(inputs: ModuleInputs, rtol: float, *, precise: bool = True) -> Triplets:
    """The SVD of ``sum_t w_t B_t A_t`` restricted to values above ``rtol * sigma_1`` (the numerical rank)."""
    B, A = concat_factors(inputs.factors, inputs.weights)
    return svd_of(B, A, rtol=max(rtol, DEFAULT_RTOL), precise=precise)


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes projection of ``X`` (d x K): ``P Q^T`` from ``X = P diag(lam) Q^T``.

    For K <= d this is the nearest matrix with orthonormal columns, computed as a
    thin QR plus a K x K SVD (O(d K^2)); in float64 because stacked singular
    vectors of related tasks can be nearly collinear.
    """
    work = X.double()
    if work.shape[0] >= work.shape[1]:
        Q, R = torch.linalg.qr(work, mode="reduced")
        P, _, Qh = torch.linalg.svd(R)
        return Q @ (P @ Qh)
    P, _, Qh = torch.linalg.svd(work, full_matrices=False)
    return P @ Qh


def zero_result(inputs: ModuleInputs) -> Factored:
    """An all-zero delta, kept as one zero rank unit so PEFT still has a module."""
    f = inputs.factors[0]
    return Factored(B=f.B.new_zeros(f.d_out, 1), A=f.A.new_zeros(1, f.d_in))


def balanced(parts: Triplets, scale: float, dtype: torch.dtype) -> Factored:
    """``scale * U diag(S) Vh`` as LoRA factors in ``dtype``, the magnitude split evenly between B and A."""
    root = (abs(scale) * parts.S).sqrt().to(dtype)
    B = parts.U.to(dtype, copy=True).mul_(-root if scale < 0 else root)
    return Factored(B=B, A=parts.Vh.to(dtype, copy=True).mul_(root[:, None]))


def stack(parts: Sequence[Triplets]) -> Triplets:
    """Concatenate triplets side by side: U and Vh^T column-wise, S end to end."""
    return Triplets(torch.cat([p.U for p in parts], dim=1), torch.cat([p.S for p in parts]),
                    torch.cat([p.Vh for p in parts], dim=0))


def orthogonalised(parts: Sequence[Triplets]) -> Triplets:
    """Stack the triplets, then replace both stacks of singular vectors by their Procrustes projections."""
    stacked = stack(parts)
    return Triplets(polar(stacked.U), stacked.S, polar(stacked.Vh.T).T)


# --- TSV-M ---------------------------------------------------------------------------------------------------------


class TsvConfig(MethodConfig):
    lambda_: float = Field(1.0, alias="lambda", description="global scale on the merged delta (the paper's alpha)")
    k_per_task: int | None = Field(
        None, ge=1,
        description="singular components kept per task; default the paper's budget floor(min(d_out, d_in) / T), "
        "which keeps every component of a LoRA",
    )


def tsv(cfg: TsvConfig, inputs: ModuleInputs) -> Factored:
    """TSV-M: each task's top singular triplets, both vector stacks Procrustes-orthogonalised, values kept.

    A task contributes at most its numerical rank (never null-space vectors with zero singular values,
    which would still move the Procrustes projection); with the default budget that is every LoRA component.
    """
    f = inputs.factors[0]
    budget = cfg.k_per_task or max(min(f.d_out, f.d_in) // len(inputs.factors), 1)
    parts = [t.top(budget) for t in task_svds(inputs)]
    if sum(p.S.numel() for p in parts) == 0:
        return zero_result(inputs)
    merged = orthogonalised(parts)
    return balanced(merged, cfg.lambda_, inputs.factors[0].B.dtype)


# --- Iso-C and Iso-CTS ---------------------------------------------------------------------------------------------

_RTOL_HELP = ("singular values below this fraction of the largest singular value of the sum are dropped before "
              "flattening; a LoRA sum has rank <= sum of ranks, and averaging over its numerical zeros (the paper's "
              "full-spectrum form) shrinks the mean and adds full-rank noise")


class IsoCConfig(MethodConfig):
    lambda_: float = Field(1.0, alias="lambda", description="global scale (the paper's alpha; re-tune it for LoRA)")
    spectrum_rtol: float = Field(1e-3, ge=0.0, lt=1.0, description=_RTOL_HELP)


def iso_c(cfg: IsoCConfig, inputs: ModuleInputs) -> Factored:
    """Iso-C on the non-zero spectrum of the sum: ``mean(S) * U V^T`` over the numerical rank of sum_t tau_t."""
    total = sum_svd(inputs, cfg.spectrum_rtol, precise=False)  # no cancellation here: float32 QRs suffice
    if total.S.numel() == 0:
        return zero_result(inputs)
    flat = torch.full_like(total.S, float(total.S.double().mean()))
    return balanced(Triplets(total.U, flat, total.Vh), cfg.lambda_, inputs.factors[0].B.dtype)


class IsoCtsConfig(MethodConfig):
    lambda_: float = Field(1.0, alias="lambda", description="global scale (the paper's alpha; re-tune it for LoRA)")
    common_fraction: float = Field(0.8, gt=0.0, le=1.0, description="share of the rank given to the common subspace")
    rank: int | None = Field(
        None, ge=1,
        description="total rank K split into common and task-specific directions; default the sum of the input ranks "
        "(replaces the paper's min(d_out, d_in), which for a LoRA sum is mostly numerical zeros)",
    )
    spectrum_rtol: float = Field(1e-3, ge=0.0, lt=1.0, description=_RTOL_HELP)


def split_rank(total: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common dims k_c, dims per task q) with ``total - k_c = tasks * q``, as in the reference code."""
    common = int(total * common_fraction)
    per_task = min(round((total - common) / tasks), total // tasks)
    return total - tasks * per_task, per_task


def iso_cts(cfg: IsoCtsConfig, inputs: ModuleInputs) -> Factored:
    """Iso-CTS: the top k_c directions of the sum plus each task's top q directions outside them,
    orthogonalised, with every singular value replaced by the mean."""
    f = inputs.factors[0]
    total = sum_svd(inputs, cfg.spectrum_rtol)
    if total.S.numel() == 0:
        return zero_result(inputs)
    rank = min(cfg.rank or sum(inputs.ranks), f.d_out, f.d_in)
    k_common, per_task = split_rank(rank, len(inputs.factors), cfg.common_fraction)
    common = total.top(k_common)
    floor = cfg.spectrum_rtol * float(total.S[0])
    parts = [common]
    if per_task > 0:
        for factors, w in inputs.weighted():
            B = w * factors.B.double()
            outside = B - common.U @ (common.U.T @ B)
            parts.append(svd_of(outside, factors.A).above(floor).top(per_task))
    if sum(p.S.numel() for p in parts) == 0:
        return zero_result(inputs)
    merged = orthogonalised(parts)
    flat = torch.full_like(merged.S, float(merged.S.double().mean()))
    return balanced(Triplets(merged.U, flat, merged.Vh), cfg.lambda_, inputs.factors[0].B.dtype)


# --- STAR ----------------------------------------------------------------------------------------------------------


class StarConfig(MethodConfig):
    eta: float = Field(40.0, gt=0.0, le=100.0, description="percent of each task's nuclear norm kept by its top singular values")
    lambda_: float = Field(1.0, alias="lambda", description="global scale on the merged delta")
    normalize: bool = Field(True, description="divide by the sum of weights (the paper's simple average); false: weighted sum")


def star_truncate(task: Triplets, eta: float) -> Triplets:
    """Keep the fewest top singular values holding eta % of the nuclear norm, rescaled to the full nuclear norm."""
    if task.S.numel() == 0:
        return task
    S = task.S
    nuclear = S.sum()
    keep = min(int(torch.searchsorted(torch.cumsum(S, 0), nuclear * eta / 100.0)) + 1, S.numel())
    kept = task.top(keep)
    rescaled = S[:keep] * (nuclear / S[:keep].sum())
    return Triplets(kept.U, rescaled, kept.Vh)


def star(cfg: StarConfig, inputs: ModuleInputs) -> Factored:
    """STAR: per task, spectral truncation to eta % of the nuclear norm and rescale; then the (weighted) mean."""
    parts = [star_truncate(t, cfg.eta) for t in task_svds(inputs)]
    if sum(p.S.numel() for p in parts) == 0:
        return zero_result(inputs)
    scale = cfg.lambda_
    if cfg.normalize:
        weight_sum = sum(inputs.weights)
        if math.isclose(weight_sum, 0.0, abs_tol=1e-12):
            raise ValueError("normalize divides by the sum of the weights, which is zero; set normalize: false")
        scale /= weight_sum
    return balanced(stack(parts), scale, inputs.factors[0].B.dtype)
