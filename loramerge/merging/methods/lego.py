"""LoRA-LEGO (Zhao et al., ICLR 2025): merge LoRAs by k-means over their rank units.

Each rank j of an adapter is a unit ("MSU") ``(a_j, b_j)`` with ``delta_W = sum_j b_j a_j^T``
(scale and the user's weight folded into ``b``). The units of every adapter of a module are
pooled, their gauge ``(c a, b / c)`` is fixed by balancing ``|a| = |b|`` and their sign by a
deterministic rule (and re-aligned to the centroid inside k-means, so ``u`` and ``-u`` never
cancel), then clustered into k groups with seeded k-means++. Each cluster's mean unit is one
unit of the merged rank-k LoRA. Dual reweighting (both optional): parameter reweighting gives
each centroid factor the mean norm of its members (averaging non-parallel vectors shrinks it),
output reweighting scales the merged delta to the mean norm of the input deltas (the output
variance on isotropic inputs). With k equal to the number of units every unit is its own
cluster and, without output reweighting, the result is the exact concatenation.

Works entirely on the factors: O(iters * R * k * (d_in + d_out)) per module, never B @ A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from loramerge.core.ops import generator_for
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs

_WORK = torch.float64


class LegoConfig(MethodConfig):
    k: int | None = Field(None, ge=1, description="merged rank (default: the largest input rank)")
    feature: Literal["direction", "raw"] = Field(
        "direction", description="cluster unit directions [a/|a|; b/|b|] (cosine) or the balanced [a; b] (magnitude counts)")
    sign_align: bool = Field(True, description="treat u and -u as the same unit inside k-means (sign-invariant distance)")
    parameter_reweight: bool = Field(True, description="rescale each centroid's a and b to the mean norm of its members")
    output_reweight: Literal["none", "norm"] = Field(
        "norm", description="'norm': scale the merged delta to the mean Frobenius norm of the (weighted) input deltas")
    gamma: float = Field(1.0, gt=0.0, description="a user-set scale on the merged delta (applied last)")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations at most")
    n_init: int = Field(1, ge=1, description="k-means++ restarts; the lowest inertia wins")


@dataclass(frozen=True)
class Units:
    """A pool of rank units: row i of ``a`` and of ``b`` is one unit, ``delta = b^T a``."""

    a: torch.Tensor  # (N, d_in)
    b: torch.Tensor  # (N, d_out)

    @property
    def count(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Clustering:
    labels: torch.Tensor  # (N,) cluster of each unit
    signs: torch.Tensor  # (N,) +1/-1: the sign that aligns each unit with its centroid
    inertia: float


def pool_units(inputs: ModuleInputs) -> Units:
    """All rank units of the module's adapters, each adapter's weight folded into its b."""
    # the units are few (R) and the k-means is seeded by a CPU generator: cluster on the CPU
    b = torch.cat([w * f.B.to('cpu', _WORK) for f, w in zip(inputs.factors, inputs.weights, strict=True)], dim=1).T
    a = torch.cat([f.A.to('cpu', _WORK) for f in inputs.factors], dim=0)
    return Units(a=a, b=b)


def canonicalize(units: Units) -> Units:
    """Fix each unit's gauge and sign without changing ``b a^T``; drop all-zero units.

    Gauge: ``a <- a sqrt(|b|/|a|)``, ``b <- b sqrt(|a|/|b|)`` so ``|a| = |b|``.
    Sign: flip (a, b) together so the largest-magnitude entry of ``[a/|a|; b/|b|]`` is positive
    (the first such entry on ties), a rule that depends on the unit alone.
    """
    na, nb = units.a.norm(dim=1), units.b.norm(dim=1)
    keep = (na > 0) & (nb > 0)
    a, b, na, nb = units.a[keep], units.b[keep], na[keep], nb[keep]
    c = (nb / na).sqrt()
    a, b = a * c[:, None], b / c[:, None]
    direction = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)], dim=1)
    pivot = direction.gather(1, direction.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(a.dtype)
    return Units(a=a * sign[:, None], b=b * sign[:, None])


def features(units: Units, kind: Literal["direction", "raw"]) -> torch.Tensor:
    """The vectors k-means sees: unit directions (norm 1) or the balanced factors themselves."""
    if kind == "raw":
        return torch.cat([units.a, units.b], dim=1)
    a = units.a / units.a.norm(dim=1, keepdim=True)
    b = units.b / units.b.norm(dim=1, keepdim=True)
    return torch.cat([a, b], dim=1) / math.sqrt(2.0)


def _distances(x: torch.Tensor, centers: torch.Tensor, sign_align: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (N x k) to each centre and the sign of x that attains them."""
    sq_x = (x * x).sum(1, keepdim=True)
    sq_c = (centers * centers).sum(1)[None, :]
    inner = x @ centers.T
    if sign_align:
        signs = torch.where(inner < 0, -1.0, 1.0).to(x.dtype)
        inner = inner.abs()
    else:
        signs = torch.ones_like(inner)
    return (sq_x + sq_c - 2 * inner).clamp_(min=0.0), signs


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator, sign_align: bool) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each next centre drawn with probability ~ D^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = _distances(x, x[first:first + 1], sign_align)[0][:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0:
            nxt = int(torch.multinomial(closest / total, 1, generator=generator))
        else:  # every point sits on a centre already: take the first unused one
            nxt = next(i for i in range(n) if i not in chosen)
        chosen.append(nxt)
        closest = torch.minimum(closest, _distances(x, x[nxt:nxt + 1], sign_align)[0][:, 0])
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, sign_align: bool = True,
           max_iter: int = 100, n_init: int = 1) -> Clustering:
    """Seeded Lloyd k-means with k-means++ init; sign-invariant when ``sign_align``.

    An emptied cluster takes the point farthest from its centre, so every cluster keeps a
    member. Deterministic for a given generator state.
    """
    n = x.shape[0]
    if k >= n:
        return Clustering(labels=torch.arange(n), signs=torch.ones(n, dtype=x.dtype), inertia=0.0)
    best: Clustering | None = None
    for _ in range(n_init):
        centers = kmeans_pp_init(x, k, generator, sign_align)
        labels = torch.full((n,), -1, dtype=torch.long)
        unit_signs = torch.zeros(n, dtype=x.dtype)
        for _ in range(max_iter):
            dist, signs = _distances(x, centers, sign_align)
            new_labels = _fill_empty(dist.argmin(dim=1), dist, k)
            new_signs = signs.gather(1, new_labels[:, None]).squeeze(1)
            if torch.equal(new_labels, labels) and torch.equal(new_signs, unit_signs):
                break
            labels, unit_signs = new_labels, new_signs
            centers = _centroids(x * unit_signs[:, None], labels, k)
        dist, signs = _distances(x, centers, sign_align)
        unit_signs = signs.gather(1, labels[:, None]).squeeze(1)
        inertia = float(dist.gather(1, labels[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = Clustering(labels=labels, signs=unit_signs, inertia=inertia)
    assert best is not None
    return best


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    labels = labels.clone()
    for c in range(k):
        if (labels == c).any():
            continue
        own = dist.gather(1, labels[:, None]).squeeze(1)
        counts = torch.bincount(labels, minlength=k)
        own[counts[labels] <= 1] = -1.0  # never empty another cluster
        labels[int(own.argmax())] = c
    return labels


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).clamp_(min=1).to(x.dtype)
    return sums / counts[:, None]


def _rescale_to_member_norm(mean: torch.Tensor, members: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Parameter reweighting: each centroid gets the mean norm of its cluster's members."""
    target = _centroids(members.norm(dim=1, keepdim=True), labels, k).squeeze(1)
    current = mean.norm(dim=1)
    factor = torch.where(current > 0, target / current.clamp(min=torch.finfo(mean.dtype).tiny), 0.0)
    return mean * factor[:, None]


def _delta_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """``|B A|_F`` from the factors: sqrt(sum((B^T B) * (A A^T)))."""
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def lego_merge(units: Units, k: int, cfg: LegoConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster canonical units into k groups; return the centroid LoRA (B: d_out x k', A: k' x d_in)."""
    canon = canonicalize(units)
    if canon.count == 0:
        return torch.zeros(units.b.shape[1], 1, dtype=_WORK), torch.zeros(1, units.a.shape[1], dtype=_WORK)
    k = min(k, canon.count)
    fit = kmeans(features(canon, cfg.feature), k, generator=generator, sign_align=cfg.sign_align,
                 max_iter=cfg.max_iter, n_init=cfg.n_init)
    a = canon.a * fit.signs[:, None]
    b = canon.b * fit.signs[:, None]
    a_bar, b_bar = _centroids(a, fit.labels, k), _centroids(b, fit.labels, k)
    if cfg.parameter_reweight:
        a_bar = _rescale_to_member_norm(a_bar, a, fit.labels, k)
        b_bar = _rescale_to_member_norm(b_bar, b, fit.labels, k)
    return b_bar.T.contiguous(), a_bar


def lora_lego(cfg: LegoConfig, inputs: ModuleInputs) -> Factored:
    """LoRA-LEGO on one module: pool, canonicalise, k-means, centroids, dual reweighting."""
    k = cfg.k if cfg.k is not None else max(inputs.ranks)
    generator = generator_for(inputs.seed, "lora_lego", inputs.name)
    B, A = lego_merge(pool_units(inputs), k, cfg, generator)
    scale = cfg.gamma
    if cfg.output_reweight == "norm":
        target = sum(abs(w) * _delta_norm(f.B.to('cpu', _WORK), f.A.to('cpu', _WORK))
                     for f, w in zip(inputs.factors, inputs.weights, strict=True)) / len(inputs.factors)
        current = _delta_norm(B, A)
        scale *= target / current if current > 0 else 0.0
    out_dtype, device = inputs.factors[0].B.dtype, inputs.factors[0].B.device
    return Factored(B=(B * scale).to(device, out_dtype), A=A.to(device, out_dtype))
