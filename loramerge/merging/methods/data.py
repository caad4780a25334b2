"""Data-informed merges (docs: merging with a little data): RegMean, RegMean++ and Fisher merging from
calibration statistics (LiNeS, data-free, is in lines.py).

Each function reads the statistics from ``inputs.context`` (a ``loramerge.data.statistics.MergeStatistics``
that the engine builds from the recipe's ``calibration:`` / ``data:``). Adapters that lack a module still count
in the statistics' sums there: their fine-tuned weight at that module is ``W0`` (delta 0), as in the papers'
full-weight formulas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pydantic import Field

from loramerge.merging.methods.base import Dense, Factored, MethodConfig, ModuleInputs

log = logging.getLogger("loramerge.merging.methods.data")


def _stats(inputs: ModuleInputs, method: str):
    stats = inputs.context
    if stats is None or not hasattr(stats, "gram"):
        raise ValueError(f"{method} needs calibration statistics (recipe `calibration:` or `data:`)")
    if inputs.factors[0].kind != "linear":
        raise ValueError(f"{method} merges linear modules only (an embedding LoRA has no input Gram)")
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# RegMean
# ---------------------------------------------------------------------------------------------------------------------


class RegMeanConfig(MethodConfig):
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="scale of each Gram's off-diagonal (the paper's alpha)")
    ridge: float = Field(0.0, ge=0.0, description="ridge added to the Gram sum, relative to its mean diagonal "
                                                  "(0: only when the sum is singular, then reported)")


def scaled_gram(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """``G'``: the off-diagonal scaled by alpha, the diagonal kept (a new tensor)."""
    out = G * alpha
    out.diagonal().copy_(G.diagonal())
    return out


def cholesky_with_ridge(S: torch.Tensor, ridge: float, where: str, notes: list[str] | None = None) -> torch.Tensor:
    """Cholesky factor of ``S`` (float64); a singular ``S`` gets a growing ridge relative to its mean diagonal."""
    scale = float(S.diagonal().mean().clamp_min(1e-30))
    tried = ridge
    while True:
        L, info = torch.linalg.cholesky_ex(S + tried * scale * torch.eye(S.shape[0], dtype=S.dtype) if tried else S)
        if int(info) == 0:
            break
        tried = 1e-8 if tried == 0 else tried * 10
        if tried > 1:
            raise ValueError(f"the Gram sum at {where} is not positive definite even with a ridge of its mean diagonal")
    if tried != ridge:
        note = f"regmean: the Gram sum at {where} is singular; solved with a ridge of {tried:.0e} x its mean diagonal"
        log.warning(note)
        if notes is not None:
            notes.append(note)
    return L


@dataclass(frozen=True)
class _InputSolve:
    """What every module reading one input shares: each adapter's Gram and the Cholesky factor of the sum."""

    grams: dict[str, torch.Tensor]  # adapter name -> G_t (float64, as stored: unscaled)
    cholesky: torch.Tensor  # L with L L^T = S = sum_t G_t' (+ ridge), float64


def _input_solve(stats, module: str, cfg: RegMeanConfig) -> _InputSolve:
    key = stats.input_key(module)
    grams = {n: stats.gram(n, module) for n in stats.names}  # each Gram read once per module input
    S = torch.zeros_like(next(iter(grams.values())))
    for G in grams.values():
        S.add_(G)
    diagonal = S.diagonal().clone()  # sum_t G_t' = (sum_t G_t)': the scaling is linear
    S.mul_(cfg.alpha).diagonal().copy_(diagonal)
    return _InputSolve(grams, cholesky_with_ridge(S, cfg.ridge, key, stats.notes))


def _scaled_times(G: torch.Tensor, alpha: float, X: torch.Tensor) -> torch.Tensor:
    """``G' X`` without forming ``G'``: ``alpha G X + (1 - alpha) diag(G) X``."""
    out = G @ X
    return out.mul_(alpha).addcmul_(G.diagonal().unsqueeze(1), X, value=1.0 - alpha) if alpha != 1.0 else out


def regmean(cfg: RegMeanConfig, inputs: ModuleInputs) -> Factored:
    """``dW* = sum_t w_t B_t (A_t G_t' S^-1)``, ``S = sum_t G_t'``: the concatenation of rank sum r_t.

    Per module input (shared by q/k/v, by gate/up): each Gram read once, one Cholesky factorisation; per module:
    one solve for every adapter's rows at once; never a d_out x d_in matrix. Float64 throughout: the sum can be
    ill-conditioned (LLM activations have outlier dimensions), and the factorisation is a small part of the time.
    """
    stats = _stats(inputs, "regmean")
    key = stats.input_key(inputs.name)
    solve = stats.memo(("regmean", key, cfg.alpha, cfg.ridge), lambda: _input_solve(stats, inputs.name, cfg))
    rhs = torch.cat([_scaled_times(solve.grams[name], cfg.alpha, f.A.double().T)
                     for f, name in zip(inputs.factors, inputs.adapter_names)], dim=1)  # G_t' A_t^T: (d_in, sum r)
    A = torch.cholesky_solve(rhs, solve.cholesky).T  # A_t G_t' S^-1 (G', S symmetric)
    B = torch.cat([w * f.B.double() for f, w in zip(inputs.factors, inputs.weights)], dim=1)
    dtype = inputs.factors[0].A.dtype
    return Factored(B=B.to(dtype), A=A.to(dtype))


def regmean_plus(cfg: RegMeanConfig, inputs: ModuleInputs) -> Factored:
    """RegMean++: the module's RegMean result from the partially merged model's statistics. The engine's data
    pass (``loramerge.data.regmean_plus``) merges block by block (each block's inputs depend on the blocks merged
    before it) and hands every module's result over as the context."""
    merged = inputs.context
    if not isinstance(merged, dict) or inputs.name not in merged:
        raise ValueError("regmean_plus needs the block-by-block pass (recipe `data:` and `base_model:`)")
    return merged[inputs.name]


# ---------------------------------------------------------------------------------------------------------------------
# Fisher merging
# ---------------------------------------------------------------------------------------------------------------------


class FisherConfig(MethodConfig):
    floor: float = Field(1e-6, ge=0.0, description="added to every Fisher value, relative to their mean "
                                                   "(keeps the division defined where all Fishers vanish)")
    normalize: bool = Field(False, description="divide each adapter's Fisher by its mean over the module, so a "
                                               "confident (low-loss) model is not silenced; not in the paper")


def fisher(cfg: FisherConfig, inputs: ModuleInputs) -> Dense:
    """``dW* = sum_t w_t F_t * dW_t / sum_t w_t F_t`` element-wise (the paper's weighted Fisher average), with
    ``F_t ~ outer(E[g^2], E[x^2])`` (Kronecker-factored diagonal). Densifies one module; the rank policy follows.
    """
    stats = _stats(inputs, "fisher")
    present = dict(zip(inputs.adapter_names, zip(inputs.factors, inputs.weights)))
    factors = {n: stats.fisher(n, inputs.name) for n in stats.names}
    if cfg.normalize:  # mean of outer(u, v) is mean(u) * mean(v)
        factors = {n: (u / u.mean().clamp_min(1e-30), v / v.mean().clamp_min(1e-30)) for n, (u, v) in factors.items()}
    weights = {n: (present[n][1] if n in present else stats.weights.get(n, 1.0)) for n in stats.names}
    mean = sum(float(u.mean() * v.mean()) for u, v in factors.values()) / len(factors)
    eps = cfg.floor * max(mean, 1e-30)
    num = torch.zeros(inputs.factors[0].d_out, inputs.factors[0].d_in, dtype=torch.float64)
    den = torch.zeros_like(num)
    for name, (u, v) in factors.items():
        F = torch.outer(u, v) + eps
        den += weights[name] * F
        if name in present:
            f, w = present[name]
            num += w * F * (f.B.double() @ f.A.double())
    if (den == 0).any():
        raise ValueError("the weighted Fisher sum is zero somewhere (weights that cancel)")
    return Dense(delta=(num / den).to(inputs.factors[0].A.dtype))


__all__ = ["FisherConfig", "RegMeanConfig", "cholesky_with_ridge", "fisher", "regmean", "regmean_plus", "scaled_gram"]
