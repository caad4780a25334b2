"""Element-wise merges on delta_W: TIES, DARE, DELLA, Model Breadcrumbs, magnitude pruning.

Each densifies one module at a time and streams over the adapters (at most a
few dense deltas live at once, never all of them); the result goes back to low
rank through the rank policy. User weights multiply the task vectors before
the method sees them (``tau_t = w_t * B_t A_t``), so with unit weights each
function is the paper's algorithm on that module.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..ops import band_mask, bernoulli_mask, elect_sign, generator_for, magnitude_mask, magprune_keep_probs, topk_threshold
from .base import Dense, MergeMethod, MethodConfig, ModuleInputs

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""(adapter position, weighted dense delta) -> the sparsified, possibly rescaled delta."""


def _dense(inputs: ModuleInputs, t: int) -> torch.Tensor:
    f = inputs.factors[t]
    return inputs.weights[t] * (f.B @ f.A)


def _weighted_sum(inputs: ModuleInputs, sparsify: Sparsifier) -> torch.Tensor:
    acc = None
    for t in range(len(inputs.factors)):
        d = sparsify(t, _dense(inputs, t))
        acc = d if acc is None else acc.add_(d)
    return acc


def _sign_resolved_merge(
    inputs: ModuleInputs, sparsify: Sparsifier, merge_func: str, majority_sign: str,
    denominator: Literal["count", "weight"] = "count",
) -> torch.Tensor:
    """Elect a sign per entry from the sparsified task vectors, then merge the agreeing entries.

    Two passes over the adapters (the sparsifier must be deterministic): the
    first accumulates the mass for the election, the second the agreeing values.
    """
    mass = None
    for t in range(len(inputs.factors)):
        d = sparsify(t, _dense(inputs, t))
        contribution = torch.sign(d) if majority_sign == "frequency" else d
        mass = contribution if mass is None else mass.add_(contribution)
    sign = elect_sign(mass)
    del mass
    acc = torch.zeros_like(sign)
    norm = torch.zeros_like(sign)
    for t in range(len(inputs.factors)):
        d = sparsify(t, _dense(inputs, t))
        agree = (d != 0) & (torch.sign(d) == sign)
        if merge_func == "max":
            acc = torch.where(agree & (d.abs() > acc.abs()), d, acc)
            continue
        acc.add_(torch.where(agree, d, 0.0))
        norm.add_(agree.to(norm.dtype) * (abs(inputs.weights[t]) if denominator == "weight" else 1.0))
    if merge_func == "mean":
        return acc / norm.clamp_(min=1.0 if denominator == "count" else 1e-12)
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
        return d if thr is None else d.masked_fill_(d.abs() < thr, 0.0)

    merged = _sign_resolved_merge(inputs, trim, cfg.merge_func, cfg.majority_sign)
    return Dense(cfg.lambda_ * merged)


class DareConfig(MethodConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="keep probability (1 - drop rate p)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")
    rescale: bool = Field(True, description="divide survivors by the density (unbiased, as in the paper)")


class DareTiesConfig(DareConfig):
    majority_sign: Literal["total", "frequency"] = "total"


def _dare(cfg: DareConfig, inputs: ModuleInputs) -> Sparsifier:
    def drop(t: int, d: torch.Tensor) -> torch.Tensor:
        if cfg.density >= 1.0:
            return d
        gen = generator_for(inputs.seed, "dare", inputs.name, inputs.adapter_names[t], device=d.device)
        mask = bernoulli_mask(d.shape, cfg.density, gen, device=d.device)
        d.masked_fill_(~mask, 0.0)
        return d.div_(cfg.density) if cfg.rescale else d

    return drop


def dare_linear(cfg: DareConfig, inputs: ModuleInputs) -> Dense:
    """DARE: drop entries at random (keep prob. density), rescale, then weighted sum."""
    return Dense(cfg.lambda_ * _weighted_sum(inputs, _dare(cfg, inputs)))


def dare_ties(cfg: DareTiesConfig, inputs: ModuleInputs) -> Dense:
    """DARE's random drop followed by TIES sign election and disjoint mean."""
    return Dense(cfg.lambda_ * _sign_resolved_merge(inputs, _dare(cfg, inputs), "mean", cfg.majority_sign))


class DellaConfig(MethodConfig):
    density: float = Field(0.7, gt=0.0, le=1.0, description="mean keep probability d (official example: drop 0.3)")
    epsilon: float = Field(0.07, ge=0.0, description="half-width of the keep-probability window (window 0.14)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector (official example 1.1)")
    elect_sign: bool = Field(True, description="TIES-style elect and fuse; false gives della_linear")

    @model_validator(mode="after")
    def _window_inside_unit_interval(self) -> "DellaConfig":
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
    def _band_fits(self) -> "BreadcrumbsConfig":
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
        return d.masked_fill_(~magnitude_mask(d, cfg.density), 0.0)

    return Dense(cfg.lambda_ * _weighted_sum(inputs, prune))


TIES = MergeMethod(
    name="ties", config_cls=TiesConfig, fn=ties, kind="elementwise", exact=False,
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)",
    url="https://arxiv.org/abs/2306.01708", summary="trim top-k%, elect sign by mass, disjoint mean",
)
DARE_LINEAR = MergeMethod(
    name="dare_linear", config_cls=DareConfig, fn=dare_linear, kind="elementwise", exact=False,
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al., ICML 2024)",
    url="https://arxiv.org/abs/2311.03099", summary="random drop + rescale, weighted sum (seeded)",
)
DARE_TIES = MergeMethod(
    name="dare_ties", config_cls=DareTiesConfig, fn=dare_ties, kind="elementwise", exact=False,
    paper=DARE_LINEAR.paper, url=DARE_LINEAR.url, summary="random drop + rescale, TIES sign election (seeded)",
)
DELLA = MergeMethod(
    name="della", config_cls=DellaConfig, fn=della, kind="elementwise", exact=False,
    paper="DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., 2024)",
    url="https://arxiv.org/abs/2406.11617", summary="MAGPRUNE drop by magnitude rank, elect, weighted fuse (seeded)",
)
BREADCRUMBS = MergeMethod(
    name="breadcrumbs", config_cls=BreadcrumbsConfig, fn=breadcrumbs, kind="elementwise", exact=False,
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)",
    url="https://arxiv.org/abs/2312.06795", summary="drop outliers and small entries per task, then sum",
)
MAGNITUDE_PRUNE = MergeMethod(
    name="magnitude_prune", config_cls=MagnitudePruneConfig, fn=magnitude_prune, kind="elementwise", exact=False,
    paper="PEFT magnitude_prune (magnitude pruning of task vectors)",
    url="https://huggingface.co/docs/peft/main/en/package_reference/merge_utils",
    summary="keep top-k% magnitudes per task, then weighted sum",
)
