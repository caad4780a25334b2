"""What is in an adapter, and how adapters overlap, computed from the factors (no dense deltas)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch

from loramerge.core.adapter import LoraAdapter
from loramerge.core.factored import factored_svd, frobenius_inner


@dataclass(frozen=True)
class ModuleStats:
    name: str
    rank: int
    scale: float
    norm: float
    effective_rank: float
    """exp of the entropy of the normalised singular values (Roy & Vetterli): 1 for one direction, r for a flat spectrum."""
    stable_rank: float
    """||dW||_F^2 / sigma_1^2."""


@dataclass
class AdapterSummary:
    name: str
    source: str
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None
    n_modules: int
    total_rank: int
    parameters: int
    dtype: str
    file_bytes: int
    modules: list[ModuleStats] = field(default_factory=list)

    @property
    def mean_effective_rank(self) -> float:
        return sum(m.effective_rank for m in self.modules) / max(len(self.modules), 1)

    def to_dict(self) -> dict:
        return asdict(self)


def spectrum_stats(S: torch.Tensor) -> tuple[float, float, float]:
    """(Frobenius norm, effective rank, stable rank) from singular values."""
    S = S.double()
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0.0, 0.0, 0.0
    p = S / S.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    norm_sq = float((S ** 2).sum())
    return math.sqrt(norm_sq), math.exp(entropy), norm_sq / float(S[0]) ** 2


def summarize(adapter: LoraAdapter, *, per_module: bool = True) -> AdapterSummary:
    cfg = adapter.config
    summary = AdapterSummary(
        name=adapter.name, source=adapter.source.reference, base_model=adapter.base_model,
        r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora")),
        target_modules=cfg.get("target_modules"), n_modules=len(adapter.modules), total_rank=adapter.total_rank,
        parameters=sum(m.rank * (m.d_in + m.d_out) for m in adapter.modules.values()),
        dtype=str(adapter.dtype).replace("torch.", ""), file_bytes=adapter.weights_path.stat().st_size,
    )
    if per_module:
        for name, info in adapter.modules.items():
            f = adapter.factors(name)
            _, S, _ = factored_svd(f.B, f.A)
            norm, eff, stable = spectrum_stats(S)
            summary.modules.append(ModuleStats(name=name, rank=info.rank, scale=info.scale, norm=norm,
                                               effective_rank=eff, stable_rank=stable))
    return summary


@dataclass(frozen=True)
class PairOverlap:
    """How two adapters relate on the modules they share (means over those modules)."""

    first: str
    second: str
    shared_modules: int
    cosine: float
    """<dW_i, dW_j>_F / (|dW_i| |dW_j|): +1 same direction, -1 opposite, ~0 unrelated."""
    subspace_overlap: float
    """||U_i^T U_j||_F^2 / min(r_i, r_j) of the column spaces: 1 nested, ~r/d_out for random."""
    worst_cosine_module: str | None = None
    worst_cosine: float = 0.0


def pairwise_overlap(adapters: list[LoraAdapter]) -> list[PairOverlap]:
    """Interference between every pair of adapters, per module, from the factors."""
    out = []
    for a, b in combinations(adapters, 2):
        shared = sorted(set(a.modules) & set(b.modules))
        cosines, overlaps = [], []
        worst: tuple[float, str | None] = (1.0, None)
        for name in shared:
            fa, fb = a.factors(name), b.factors(name)
            if fa.d_out != fb.d_out or fa.d_in != fb.d_in:
                continue
            na, nb = math.sqrt(max(frobenius_inner(fa, fa), 0)), math.sqrt(max(frobenius_inner(fb, fb), 0))
            cos = frobenius_inner(fa, fb) / (na * nb) if na > 0 and nb > 0 else 0.0
            Ua, _, _ = factored_svd(fa.B, fa.A)
            Ub, _, _ = factored_svd(fb.B, fb.A)
            ov = float((Ua.T @ Ub).pow(2).sum()) / max(min(Ua.shape[1], Ub.shape[1]), 1)
            cosines.append(cos)
            overlaps.append(ov)
            if cos < worst[0]:
                worst = (cos, name)
        n = max(len(cosines), 1)
        out.append(PairOverlap(first=a.name, second=b.name, shared_modules=len(cosines), cosine=sum(cosines) / n,
                               subspace_overlap=sum(overlaps) / n, worst_cosine_module=worst[1],
                               worst_cosine=worst[0] if worst[1] else 0.0))
    return out
