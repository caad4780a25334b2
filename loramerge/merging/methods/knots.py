"""KnOTS: one joint SVD of a module's adapters, then TIES, DARE or task arithmetic on the aligned coordinates.

The horizontal concatenation ``C = [dW_1 | ... | dW_T] = B_cat blockdiag(A_1, ..., A_T)``
has the thin SVD ``U diag(S) [V_1^T | ... | V_T^T]``, so ``dW_t = U (S V_t^T)``:
every task is written in one shared output basis U with coordinates
``Z_t = S V_t^T`` (k x d_in). The SVD comes from a QR of ``B_cat``, a QR of each
``A_t^T`` and one SVD of the R x R core (R = sum of ranks); each ``Z_t`` is built
on demand from an R x r_t block and the d_in x r_t basis of ``A_t``, so no
d_out x d_in matrix is formed and the merge streams over the tasks holding a
few k x d_in arrays. The merged adapter is ``B = U``, ``A = lambda * merge(Z_1..Z_T)``.

Trimming for TIES is per module or, as in the authors' code, global across the
model: the ``prepare`` pass finds each task's model-wide magnitude threshold
exactly, in two streaming passes (a histogram over float32 bit patterns, then a
selection inside one bin).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from loramerge.core.adapter import LoraFactors
from loramerge.core.factored import DEFAULT_RTOL
from loramerge.core.ops import bernoulli_mask, elect_sign, generator_for, topk_threshold
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs
from loramerge.merging.methods.spectral import zero_result

MergeKind = Literal["ties", "dare_ties", "dare_linear", "linear"]
_DEFAULT_DENSITY: dict[str, float] = {"ties": 0.2, "dare_ties": 0.5, "dare_linear": 0.5}


@dataclass(frozen=True)
class JointBasis:
    """The thin joint SVD of ``[dW_1 | ... | dW_T]``, kept factored.

    ``U`` (d_out x k) and ``S`` (k) are shared. Task t's right singular block is
    ``V_t^T = core_blocks[t] @ input_bases[t].T`` with ``core_blocks[t]`` k x r_t
    and ``input_bases[t]`` the d_in x r_t orthonormal basis of ``A_t^T``.
    """

    U: torch.Tensor
    S: torch.Tensor
    core_blocks: tuple[torch.Tensor, ...]
    input_bases: tuple[torch.Tensor, ...]

    @property
    def rank(self) -> int:
        return self.S.numel()

    def right_block(self, t: int) -> torch.Tensor:
        """``V_t^T`` (k x d_in)."""
        return self.core_blocks[t] @ self.input_bases[t].T

    def coordinates(self, t: int) -> torch.Tensor:
        """Task t's aligned coordinates ``Z_t = S V_t^T`` (k x d_in), so that ``dW_t = U Z_t``."""
        return (self.S[:, None] * self.core_blocks[t]) @ self.input_bases[t].T


def joint_basis(factors: tuple[LoraFactors, ...], weights: tuple[float, ...], rtol: float = DEFAULT_RTOL) -> JointBasis:
    """The joint SVD of the weighted deltas concatenated along the input side, from the factors.

    QR ``B_cat = Q_B R_B`` and ``A_t^T = Q_t R_t``; the core ``R_B blockdiag(R_t^T)`` is R x R and its
    SVD ``U_K S V_K^T`` gives ``U = Q_B U_K`` and ``V_t^T = (V_K^T)[:, block t] Q_t^T``. Float64 inside.
    """
    dtype = factors[0].B.dtype
    B_cat = torch.cat([w * f.B for f, w in zip(factors, weights, strict=True)], dim=1).double()
    Q_B, R_B = torch.linalg.qr(B_cat, mode="reduced")
    bases, triangles = zip(*(torch.linalg.qr(f.A.T.double(), mode="reduced") for f in factors), strict=True)
    core = R_B @ torch.block_diag(*(R.T for R in triangles))
    U_K, S, Vh_K = torch.linalg.svd(core, full_matrices=False)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    widths = [Q.shape[1] for Q in bases]
    blocks = torch.split(Vh_K[:keep], widths, dim=1)
    return JointBasis(
        U=(Q_B @ U_K[:, :keep]).to(dtype), S=S[:keep].to(dtype),
        core_blocks=tuple(b.to(dtype) for b in blocks), input_bases=tuple(Q.to(dtype) for Q in bases),
    )


class KnotsConfig(MethodConfig):
    merge: MergeKind = Field("ties", description="the merger applied to the aligned coordinates")
    density: float | None = Field(
        None, gt=0.0, le=1.0,
        description="ties: fraction of each task's aligned coordinates kept by magnitude (default 0.2, the paper's "
        "ViT setting; its Llama runs keep 1.0); dare_*: keep probability (default 0.5); not used by linear",
    )
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged coordinates (paper: 0.6 ViT-B/32, 0.5 Llama-3-8B)")
    trim_scope: Literal["module", "global"] = Field(
        "global", description="ties trimming threshold per task: over all modules (the authors' code) or per module",
    )

    @model_validator(mode="after")
    def _parameters_fit_merge(self) -> KnotsConfig:
        if self.merge == "linear" and self.density is not None:
            raise ValueError("density has no effect with merge 'linear'; drop it or choose ties, dare_ties or dare_linear")
        if self.merge != "ties" and "trim_scope" in self.model_fields_set:
            raise ValueError(f"trim_scope applies to merge 'ties' only, not '{self.merge}'; drop it")
        return self

    @property
    def keep(self) -> float:
        return self.density if self.density is not None else _DEFAULT_DENSITY.get(self.merge, 1.0)

    @property
    def global_trim(self) -> bool:
        return self.merge == "ties" and self.trim_scope == "global" and self.keep < 1.0


Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""(task position, Z_t) -> the sparsified (possibly rescaled) coordinates."""


def _trimmer(cfg: KnotsConfig, inputs: ModuleInputs) -> Sparsifier:
    def trim(t: int, z: torch.Tensor) -> torch.Tensor:
        if cfg.global_trim:
            if not isinstance(inputs.context, dict):
                raise ValueError("trim_scope 'global' needs the prepare pass over all modules; "
                                 "merge through loramerge.merge, or set trim_scope: module")
            threshold = inputs.context[inputs.adapter_names[t]]
        else:
            threshold = topk_threshold(z, cfg.keep)
        return z if threshold is None else z.masked_fill_(z.abs() < threshold, 0.0)

    return trim


def _dropper(cfg: KnotsConfig, inputs: ModuleInputs) -> Sparsifier:
    def drop(t: int, z: torch.Tensor) -> torch.Tensor:
        if cfg.keep >= 1.0:
            return z
        gen = generator_for(inputs.seed, "knots-dare", inputs.name, inputs.adapter_names[t], device=z.device)
        z.masked_fill_(~bernoulli_mask(z.shape, cfg.keep, gen, device=z.device), 0.0)
        return z.div_(cfg.keep)

    return drop


def _summed(basis: JointBasis, sparsify: Sparsifier) -> torch.Tensor:
    acc = torch.zeros(basis.rank, basis.input_bases[0].shape[0], dtype=basis.S.dtype, device=basis.S.device)
    for t in range(len(basis.core_blocks)):
        acc.add_(sparsify(t, basis.coordinates(t)))
    return acc


def _disjoint_mean(basis: JointBasis, sparsify: Sparsifier) -> torch.Tensor:
    """TIES elect and merge: sign of the summed sparsified coordinates (zeros take the majority sign),
    then the mean over the tasks whose non-zero entry agrees. Two streaming passes (deterministic sparsifier)."""
    sign = elect_sign(_summed(basis, sparsify))
    acc = torch.zeros_like(sign)
    count = torch.zeros_like(sign)
    for t in range(len(basis.core_blocks)):
        z = sparsify(t, basis.coordinates(t))
        agree = (z != 0) & (torch.sign(z) == sign)
        acc.add_(torch.where(agree, z, 0.0))
        count.add_(agree.to(count.dtype))
    return acc.div_(count.clamp_(min=1.0))


def merge_coordinates(cfg: KnotsConfig, inputs: ModuleInputs, basis: JointBasis) -> torch.Tensor:
    """The merged coordinates ``Z_m`` (k x d_in) before the lambda scale."""
    identity: Sparsifier = lambda t, z: z  # noqa: E731
    if cfg.merge == "linear":
        return _summed(basis, identity)
    if cfg.merge == "dare_linear":
        return _summed(basis, _dropper(cfg, inputs))
    if cfg.merge == "dare_ties":
        return _disjoint_mean(basis, _dropper(cfg, inputs))
    return _disjoint_mean(basis, _trimmer(cfg, inputs))


def knots(cfg: KnotsConfig, inputs: ModuleInputs) -> Factored:
    """KnOTS on one module: ``B = U sqrt(S)``, ``A = lambda Z_m / sqrt(S)`` (an exact rebalancing of U, lambda Z_m)."""
    basis = joint_basis(inputs.factors, inputs.weights)
    if basis.rank == 0:
        return zero_result(inputs)
    merged = merge_coordinates(cfg, inputs, basis)
    root = basis.S.sqrt()
    return Factored(B=basis.U * root, A=(cfg.lambda_ * merged) / root[:, None])


# --- global (model-wide) top-k threshold --------------------------------------------------------------------------

_BINS = 1 << 15


def _magnitude_bins(values: torch.Tensor) -> torch.Tensor:
    """A monotone bin index per |value|: the top 15 non-sign bits of its float32 pattern."""
    return (values.abs().float().contiguous().view(torch.int32) >> 16).long()


def global_topk_thresholds(
    density: float, stream: Callable[[], Iterable[tuple[str, torch.Tensor]]]
) -> dict[str, float | None]:
    """Per key, the threshold that keeps the top ``density`` fraction of |values| over all its tensors.

    Equals ``topk_threshold(concatenation, density)`` without holding the concatenation: pass one
    counts values per magnitude bin, pass two collects only the bin holding the k-th largest value.
    ``stream`` must yield the same (key, tensor) pairs each time it is called.
    """
    counts: dict[str, torch.Tensor] = {}
    for key, values in stream():
        hist = torch.bincount(_magnitude_bins(values).reshape(-1), minlength=_BINS)
        counts[key] = counts[key] + hist if key in counts else hist
    targets: dict[str, tuple[int, int]] = {}
    thresholds: dict[str, float | None] = {}
    for key, hist in counts.items():
        n = int(hist.sum())
        k = int(density * n)
        if k >= n:
            thresholds[key] = None
        elif k <= 0:
            thresholds[key] = float("inf")
        else:
            rank = n - k + 1  # ascending position (1-based) of the k-th largest
            cumulative = torch.cumsum(hist, 0)
            b = int(torch.searchsorted(cumulative, torch.tensor(rank, device=cumulative.device)))
            before = int(cumulative[b - 1]) if b > 0 else 0
            targets[key] = (b, rank - before)
    if targets:
        chosen: dict[str, list[torch.Tensor]] = {key: [] for key in targets}
        for key, values in stream():
            if key in targets:
                flat = values.abs().float().reshape(-1)
                chosen[key].append(flat[_magnitude_bins(flat) == targets[key][0]])
        for key, (_, position) in targets.items():
            thresholds[key] = float(torch.kthvalue(torch.cat(chosen[key]), position).values)
    return thresholds


def _coordinate_stream(modules: Iterator[ModuleInputs]) -> Iterator[tuple[str, torch.Tensor]]:
    for inputs in modules:
        basis = joint_basis(inputs.factors, inputs.weights)
        if basis.rank == 0:
            continue
        for t, name in enumerate(inputs.adapter_names):
            yield name, basis.coordinates(t)


def knots_prepare(cfg: KnotsConfig, modules: Callable[[], Iterator[ModuleInputs]]) -> dict[str, float | None] | None:
    """For global TIES trimming: each adapter's model-wide magnitude threshold on its aligned coordinates."""
    if not cfg.global_trim:
        return None
    return global_topk_thresholds(cfg.keep, lambda: _coordinate_stream(modules()))
