"""Core-space routing (CoMoL style): per module, shared bases and one exact core per adapter.

``Q_B`` (QR of ``B_cat``) and ``Q_A`` (QR of ``A_cat^T``); each adapter becomes an exact R x R core
``K_t = Q_B^T B_t A_t Q_A``; the gate reads ``v = Q_A^T x`` (rank space) and ``dy = Q_B (sum_t g_t K_t) v``.
With static weights this is exactly ``sum_t w_t B_t A_t x``. A ``SoftmaxGate(source="z")`` is the CoMoL
router (N x R parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.core.adapter import LoraFactors
from loramerge.errors import RecipeError, UnsupportedAdapterError

from .controller import AdapterLike, GatedLora
from .gated import attach_gated_lora
from .layers import GatedLayerBase, GateState, align_gate


class CoreSpaceLayer(GatedLayerBase):
    """``y = W0 x + Q_B (sum_t g_t K_t) (Q_A^T x)`` with exact cores ``K_t = Q_B^T B_t A_t Q_A``."""

    def __init__(self, name: str, base: nn.Module, kind: str, factors: Sequence[LoraFactors], present: Sequence[int],
                 state: GateState, dtype: torch.dtype, device: torch.device, trainable_cores: bool = False):
        super().__init__(name, base, kind, present, state)
        if kind != "linear":
            raise UnsupportedAdapterError("core-space routing needs Linear/Conv1D modules", module=name,
                                          fix="leave embedding LoRA out of the core-space router")
        self.ranks = tuple(f.rank for f in factors)
        Q_A, Q_B, cores = core_space(factors)
        self.register_buffer("basis_in", Q_A.T.contiguous().to(device=device, dtype=dtype))  # (R', d_in)
        self.register_buffer("basis_out", Q_B.to(device=device, dtype=dtype))  # (d_out, R')
        cores = cores.to(device=device, dtype=dtype)
        if trainable_cores:
            self.cores = nn.Parameter(cores)
        else:
            self.register_buffer("cores", cores)

    @property
    def core_rank(self) -> int:
        return self.basis_in.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        v = F.linear(x.to(self.basis_in.dtype), self.basis_in)  # (..., R')
        g = align_gate(self.request_weights().to(device=v.device, dtype=v.dtype), v)  # (..., T)
        module = self.active_gate()
        if module is not None:
            learned = module(x, v, self)
            if module.level != "adapter":
                raise RecipeError("a core-space layer takes adapter-level gates", module=self.name,
                                  fix="use SoftmaxGate(source='z') (CoMoL's router) on core-space layers")
            g = g * align_gate(learned.index_select(-1, self.present_index).to(v.dtype), v)
        per_core = torch.einsum("...j,tij->...ti", v, self.cores)  # (..., T, R')
        mixed = (g[..., None] * per_core).sum(-2)
        return F.linear(mixed, self.basis_out)


def core_space(factors: Sequence[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared bases and exact cores: ``Q_A`` (d_in x R'), ``Q_B`` (d_out x R'), cores (T, R', R').

    ``B_cat = Q_B R_B`` and ``A_cat^T = Q_A R_A`` (thin QR, float64), so ``B_t A_t = Q_B (R_B[:, t] R_A[:, t]^T) Q_A^T``:
    the core of adapter t is built from its own columns of the two R factors, no d_out x d_in matrix.
    """
    B_cat = torch.cat([f.B for f in factors], dim=1).double()
    A_cat = torch.cat([f.A for f in factors], dim=0).double()
    Q_B, R_B = torch.linalg.qr(B_cat, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A_cat.T, mode="reduced")
    cores, start = [], 0
    for f in factors:
        block = slice(start, start + f.rank)
        cores.append(R_B[:, block] @ R_A[:, block].T)
        start += f.rank
    return Q_A.float(), Q_B.float(), torch.stack(cores).float()


def attach_core_space(model: nn.Module, adapters: Sequence[AdapterLike], *, names: Sequence[str] | None = None,
                      weights: Sequence[float] | None = None, dtype: torch.dtype | None = None,
                      trainable_cores: bool = False) -> GatedLora:
    """Attach the adapters as core-space layers (CoMoL style); gates via ``softmax_gates`` or static weights."""
    def factory(name, base, kind, factors, present, state, dtype_, device):
        return CoreSpaceLayer(name, base, kind, factors, present, state, dtype_, device, trainable_cores)

    return attach_gated_lora(model, adapters, names=names, weights=weights, dtype=dtype, layer_factory=factory)


__all__ = ["CoreSpaceLayer", "attach_core_space", "core_space"]
