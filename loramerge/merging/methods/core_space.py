"""Core-space merging (Panariello et al., NeurIPS 2025, https://arxiv.org/abs/2509.17786).

Every task's LoRA is projected onto shared reference bases taken from the stacked factors: ``U`` an orthonormal
basis of the column space of ``B_cat = [B_1 ... B_T]`` (d_out x R) and ``V`` one of the row space of
``A_cat = [A_1; ...; A_T]`` (R x d_in), with ``R = sum_t r_t``. Because ``U`` and ``V`` span every factor, the
projection is lossless: ``B_t A_t = U M_t V^T`` with the small core ``M_t = (U^T B_t)(A_t V)`` (R x R at most).
A merge method then runs on the cores instead of the d_out x d_in deltas, and its result lifts back already
factored: ``B = U M*``, ``A = V^T`` (a dense core result) or ``B = U B_c``, ``A = A_c V^T`` (a factored one). The
rank policy then works on those factors (``compress_factored``); no d_out x d_in matrix is ever formed, and
mixed ranks need nothing special. Cost per module: O((d_in + d_out) R^2) for the bases and projections, plus the
method on T matrices of R x R.

Linear merges are exact in core space (they commute with the projection); element-wise methods (TIES trimming,
DARE drops) act on the core coordinates, which is the paper's method, not the dense-space one.
"""

from __future__ import annotations

import torch

from loramerge.core.adapter import LoraFactors
from loramerge.core.factored import _work_dtype
from loramerge.errors import RecipeError
from loramerge.merging.methods.base import Dense, Factored, MergeMethod, MethodFn, MethodResult, ModuleInputs

Space = str
"""``"dense"`` (the methods as published, on delta_W) or ``"core"`` (on the core matrices)."""

CORE_SPACE_METHODS = frozenset({
    "task_arithmetic", "average", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "tsv",
})
"""Methods offered in core space: the paper's TA, TIES, DARE and TSV, and their element-wise siblings."""


def check_space(method: MergeMethod, space: Space, *, factorwise: bool = False) -> None:
    """Refuse ``space: core`` for methods that do not support it, with the fix."""
    if space == "dense":
        return
    if space != "core":
        raise RecipeError(f"unknown merge space '{space}'", fix="use space: dense (default) or space: core")
    if method.name not in CORE_SPACE_METHODS:
        raise RecipeError(
            f"method '{method.name}' does not support space: core",
            fix=f"drop `space: core`, or use one of: {', '.join(sorted(CORE_SPACE_METHODS))}",
        )
    if factorwise:
        raise RecipeError("factorwise and space: core cannot be combined",
                          fix="drop `factorwise: true` (core space already works on the factors)")


def _bases_and_coordinates(factors: tuple[LoraFactors, ...]):
    dtype = factors[0].B.dtype
    R = sum(f.rank for f in factors)
    work = _work_dtype(R, dtype)
    U, RB = torch.linalg.qr(torch.cat([f.B for f in factors], dim=1).to(work), mode="reduced")
    V, RA = torch.linalg.qr(torch.cat([f.A for f in factors], dim=0).T.to(work), mode="reduced")
    return U, RB, V, RA


def core_bases(factors: tuple[LoraFactors, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``U`` (d_out x k) spanning every ``B_t`` and ``V`` (d_in x k') spanning every ``A_t^T``.

    Thin QRs of the stacks (Householder: ``Q Q^T B_cat = B_cat`` exactly, rank-deficient stacks included).
    """
    U, _, V, _ = _bases_and_coordinates(factors)
    return U, V


def to_core(inputs: ModuleInputs) -> tuple[ModuleInputs, torch.Tensor, torch.Tensor]:
    """The inputs with each task's factors replaced by its core factors ``(U^T B_t, A_t V)``; also U and V.

    The coordinates are the column blocks of the QRs' triangular factors (``B_cat = U R_B`` gives
    ``U^T B_t = R_B[:, cols_t]``): no extra product, and a task's coordinates outside the span of the
    tasks before it and its own are exact zeros, not rounding noise (which a magnitude trim could keep).
    """
    U, RB, V, RA = _bases_and_coordinates(inputs.factors)
    cores, start = [], 0
    for f in inputs.factors:
        cols = slice(start, start + f.rank)
        start += f.rank
        cores.append(LoraFactors(A=RA[:, cols].T, B=RB[:, cols], kind=f.kind, scale=f.scale))
    core_inputs = ModuleInputs(
        name=inputs.name, factors=tuple(cores), weights=inputs.weights, adapter_names=inputs.adapter_names,
        seed=inputs.seed, context=inputs.context,
    )
    return core_inputs, U, V


def core_matrices(inputs: ModuleInputs) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The unweighted cores ``M_t = U^T B_t A_t V`` (for inspection and tests)."""
    core_inputs, U, V = to_core(inputs)
    return [f.B @ f.A for f in core_inputs.factors], U, V


def from_core(result: MethodResult, U: torch.Tensor, V: torch.Tensor, dtype: torch.dtype) -> Factored:
    """Lift a result on the cores back to the module: ``U M* V^T`` as factors (never densified)."""
    if isinstance(result, Dense):
        return Factored(B=(U @ result.delta.to(U.dtype)).to(dtype), A=V.T.to(dtype).contiguous())
    return Factored(B=(U @ result.B.to(U.dtype)).to(dtype), A=(result.A.to(V.dtype) @ V.T).to(dtype))


def in_core_space(fn: MethodFn) -> MethodFn:
    """The method ``fn`` run on the core matrices instead of the dense deltas."""

    def run(cfg, inputs: ModuleInputs) -> Factored:  # noqa: ANN001 - any MethodConfig
        core_inputs, U, V = to_core(inputs)
        if "k_per_task" in type(cfg).model_fields and cfg.k_per_task is None:
            # TSV's default per-task budget is the module's, floor(min(d_out, d_in) / T), not the core's
            f = inputs.factors[0]
            cfg = cfg.model_copy(update={"k_per_task": max(min(f.d_out, f.d_in) // len(inputs.factors), 1)})
        return from_core(fn(cfg, core_inputs), U, V, inputs.factors[0].B.dtype)

    run.__name__ = f"{getattr(fn, '__name__', 'method')}_in_core_space"
    run.__doc__ = f"{fn.__doc__ or ''} (in core space)"
    return run


def method_function(method: MergeMethod, space: Space, *, factorwise: bool = False) -> MethodFn:
    """The per-module function the engine runs for ``method`` in ``space``."""
    check_space(method, space, factorwise=factorwise)
    fn = method.factorwise if factorwise else method.fn
    if fn is None:  # pragma: no cover - the recipe refuses factorwise for such methods
        raise RecipeError(f"method '{method.name}' has no factorwise variant")
    return in_core_space(fn) if space == "core" else fn


__all__ = ["CORE_SPACE_METHODS", "check_space", "core_bases", "core_matrices", "from_core", "in_core_space",
           "method_function", "to_core"]
