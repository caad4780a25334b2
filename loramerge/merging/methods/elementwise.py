"""Element-wise merges on delta_W: TIES, DARE, DELLA, Model Breadcrumbs, magnitude pruning.

Each densifies one module at a time and streams over the adapters: one reused
buffer holds the current adapter's dense delta, and at most about 2.5 dense
deltas live at once (never all of them). Element-wise steps run chunk by chunk
(``ops.CHUNK_ELEMENTS``) so their temporaries stay small. The result goes back
to low rank through the rank policy. User weights multiply the task vectors before
the method sees them (``tau_t = w_t * B_t A_t``), so with unit weights each
function is the paper's algorithm on that module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from loramerge.core.ops import (
    band_mask,
    chunked_drop,
    elect_sign_int8,
    flat_chunks,
    generator_for,
    magprune_keep_probs,
    random_drop_,
    replay_drop_,
    topk_threshold,
    zero_below_,
)
from loramerge.merging.methods.base import Dense, MethodConfig, ModuleInputs

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""(adapter position, weighted dense delta) -> the sparsified, possibly rescaled delta."""


def _dense(inputs: ModuleInputs, t: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w_t * (B_t @ A_t)``, written into ``out`` when it fits (a buffer reused across adapters)."""
    f = inputs.factors[t]
    shape = (f.B.shape[0], f.A.shape[1])
    if out is None or out.shape != shape or out.dtype != f.B.dtype or out.device != f.B.device:
        out = torch.empty(shape, dtype=f.B.dtype, device=f.B.device)
    torch.matmul(f.B, f.A, out=out)
    return out.mul_(inputs.weights[t])


def _weighted_sum(inputs: ModuleInputs, sparsify: Sparsifier) -> torch.Tensor:
    acc, buf = None, None
    for t in range(len(inputs.factors)):
        buf = _dense(inputs, t, buf)
        d = sparsify(t, buf)
        if acc is None:
            acc = d
            buf = None if d is buf else buf  # the sum now owns that memory
        else:
            acc.add_(d)
    return acc


def _sign_resolved_merge(
    inputs: ModuleInputs, sparsify: Sparsifier, merge_func: str, majority_sign: str,
    denominator: Literal["count", "weight"] = "count",
) -> torch.Tensor:
    """Elect a sign per entry from the sparsified task vectors, then merge the agreeing entries.

    Two passes over the adapters (the sparsifier must be deterministic): the
    first accumulates the mass for the election, the second the agreeing values.
    The elected sign is kept as int8 (+1/-1) and agreement counts as small
    integers, so the second pass holds about 2.5 dense deltas.
    """
    buf, mass = None, None
    for t in range(len(inputs.factors)):
        buf = _dense(inputs, t, buf)
        d = sparsify(t, buf)
        if mass is None:
            mass = torch.sign(d) if majority_sign == "frequency" else d.clone()
        elif majority_sign == "frequency":
            for m, x in flat_chunks(mass, d.contiguous()):
                m.add_(torch.sign(x))
        else:
            mass.add_(d)
    buf = d = None  # not needed during the election; the second pass takes a fresh buffer
    sign = elect_sign_int8(mass)
    acc = mass.zero_()  # the mass's memory becomes the accumulator
    by_weight = denominator == "weight"
    count_dtype = torch.uint8 if len(inputs.factors) < 256 else torch.int32
    norm = torch.zeros_like(acc) if by_weight else torch.zeros(acc.shape, dtype=count_dtype, device=acc.device)
    for t in range(len(inputs.factors)):
        buf = _dense(inputs, t, buf)
        d = sparsify(t, buf).contiguous()
        weight = abs(inputs.weights[t])
        for a, n, x, s in flat_chunks(acc, norm, d, sign):
            agree = (x * s) > 0  # x != 0 and has the elected sign (x * +-1 is exact)
            if merge_func == "max":
                a.copy_(torch.where(agree & (x.abs() > a.abs()), x, a))
                continue
            a.add_(x * agree)  # x where it agrees, +-0.0 elsewhere: the same sums as where(agree, x, 0.0)
            if by_weight:
                n.add_(agree.to(n.dtype) * weight)
            else:
                n.add_(agree)
    if merge_func == "mean":
        for a, n in flat_chunks(acc, norm):
            a.div_(n.clamp(min=1e-12) if by_weight else n.clamp(min=1).to(a.dtype))
    return acc


class TiesConfig(MethodConfig):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept by magnitude (paper k=20%)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")
    merge_func: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean (paper), sum or max")
    majority_sign: Literal["total", "frequency"] = Field("total", description="'total' mass (paper) or a count vote")


def ties(cfg: TiesConfig, inputs: ModuleInputs) -> Dense:
    """TIES: trim each task vector to its top-k magnitudes, elect signs by mass, disjoint mean."""
    thresholds: dict[int, float | None] = {}

    def trim(t: int, d: torch.Tensor) -> torch.Tensor:
        if t not in thresholds:
            thresholds[t] = topk_threshold(d, cfg.density)
        thr = thresholds[t]
        return d if thr is None else zero_below_(d, thr)

    merged = _sign_resolved_merge(inputs, trim, cfg.merge_func, cfg.majority_sign)
    return Dense(merged.mul_(cfg.lambda_))


class DareConfig(MethodConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="keep probability (1 - drop rate p)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")
    rescale: bool = Field(True, description="divide survivors by the density (unbiased, as in the paper)")


class DareTiesConfig(DareConfig):
    majority_sign: Literal["total", "frequency"] = "total"


def _dare(cfg: DareConfig, inputs: ModuleInputs, *, keep_masks: bool = False) -> Sparsifier:
    """The seeded random drop. With ``keep_masks`` (two-pass merges), each adapter's mask is kept bit-packed
    after its first use and replayed on the second: the same mask, without drawing it again."""
    masks: dict[int, torch.Tensor] = {}

    def drop(t: int, d: torch.Tensor) -> torch.Tensor:
        if cfg.density >= 1.0:
            return d
        if t in masks:
            return replay_drop_(d, masks[t], cfg.density, cfg.rescale)
        gen = generator_for(inputs.seed, "dare", inputs.name, inputs.adapter_names[t], device=d.device)
        if not (keep_masks and chunked_drop(d)):
            return random_drop_(d, cfg.density, gen, cfg.rescale)
        masks[t] = torch.empty((d.numel() + 7) // 8, dtype=torch.uint8)
        return random_drop_(d, cfg.density, gen, cfg.rescale, record=masks[t])

    return drop


def dare_linear(cfg: DareConfig, inputs: ModuleInputs) -> Dense:
    """DARE: drop entries at random (keep prob. density), rescale, then weighted sum."""
    return Dense(_weighted_sum(inputs, _dare(cfg, inputs)).mul_(cfg.lambda_))


def dare_ties(cfg: DareTiesConfig, inputs: ModuleInputs) -> Dense:
    """DARE's random drop followed by TIES sign election and disjoint mean."""
    drop = _dare(cfg, inputs, keep_masks=True)
    return Dense(_sign_resolved_merge(inputs, drop, "mean", cfg.majority_sign).mul_(cfg.lambda_))


class DellaConfig(MethodConfig):
    density: float = Field(0.7, gt=0.0, le=1.0, description="mean keep probability d (official example: drop 0.3)")
    epsilon: float = Field(0.07, ge=0.0, description="half-width of the keep-probability window (window 0.14)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector (official example 1.1)")
    elect_sign: bool = Field(True, description="TIES-style elect and fuse; false gives della_linear")

    @model_validator(mode="after")
    def _window_inside_unit_interval(self) -> DellaConfig:
        if self.density - self.epsilon <= 0.0 or self.density + self.epsilon > 1.0:
            raise ValueError("density - epsilon must be > 0 and density + epsilon <= 1")
        return self


def della(cfg: DellaConfig, inputs: ModuleInputs) -> Dense:
    """DELLA (MAGPRUNE): magnitude-ranked keep probabilities per row, 1/p rescale, elect, weighted fuse."""

    def magprune(t: int, d: torch.Tensor) -> torch.Tensor:
        probs = magprune_keep_probs(d, cfg.density, cfg.epsilon)
        gen = generator_for(inputs.seed, "della", inputs.name, inputs.adapter_names[t], device=d.device)
        keep = torch.bernoulli(probs, generator=gen).bool()
        return torch.where(keep, d / probs, 0.0)

    if not cfg.elect_sign:
        return Dense(cfg.lambda_ * _weighted_sum(inputs, magprune))
    merged = _sign_resolved_merge(inputs, magprune, "mean", "total", denominator="weight")
    return Dense(cfg.lambda_ * merged)


class BreadcrumbsConfig(MethodConfig):
    density: float = Field(0.1, gt=0.0, le=1.0, description="fraction kept (the band below the outliers)")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest-magnitude outliers removed")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector (paper ~0.3 for 8 tasks)")
    sign_election: bool = Field(False, description="TIES sign election on the masked vectors (breadcrumbs_ties)")

    @model_validator(mode="after")
    def _band_fits(self) -> BreadcrumbsConfig:
        if self.density + self.gamma > 1.0:
            raise ValueError("density + gamma must be <= 1")
        return self


def breadcrumbs(cfg: BreadcrumbsConfig, inputs: ModuleInputs) -> Dense:
    """Model Breadcrumbs: mask out outliers and small entries per task, then sum."""

    def band(t: int, d: torch.Tensor) -> torch.Tensor:
        return d.masked_fill_(~band_mask(d, cfg.density, cfg.gamma), 0.0)

    if cfg.sign_election:
        return Dense(cfg.lambda_ * _sign_resolved_merge(inputs, band, "mean", "total"))
    return Dense(cfg.lambda_ * _weighted_sum(inputs, band))


class MagnitudePruneConfig(MethodConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each task vector kept by magnitude")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")


def magnitude_prune(cfg: MagnitudePruneConfig, inputs: ModuleInputs) -> Dense:
    """Keep each task vector's largest entries, then weighted sum."""

    def prune(t: int, d: torch.Tensor) -> torch.Tensor:
        thr = topk_threshold(d, cfg.density)
        return d if thr is None else zero_below_(d, thr)

    return Dense(_weighted_sum(inputs, prune).mul_(cfg.lambda_))
