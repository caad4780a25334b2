"""Small pure functions over dense tensors, used by the element-wise merge methods.

All masks are boolean tensors of the input's shape; ``density`` is always the
fraction of entries KEPT (PEFT's and mergekit's convention).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for (seed, module, adapter, ...), independent of iteration order."""
    text = "\x1f".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


def topk_threshold(x: torch.Tensor, density: float) -> float | None:
    """The smallest |x| kept when keeping the top ``density`` fraction; None means keep all."""
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    return float(torch.kthvalue(x.abs().reshape(-1), n - k + 1).values)


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries (TIES trim, magnitude prune)."""
    thr = topk_threshold(x, density)
    if thr is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x.abs() >= thr


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE)."""
    probs = torch.full(shape, float(density), device=device)
    return torch.bernoulli(probs, generator=generator).bool()


def magprune_keep_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE: per row, keep probability rises linearly with magnitude rank.

    Entry with ascending rank rho in a row of n gets p = (density - eps) + 2 eps rho / (n - 1).
    """
    n = x.shape[-1]
    order = torch.argsort(x.abs(), dim=-1)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    step = 2.0 * epsilon / max(n - 1, 1)
    return (density - epsilon) + ranks.to(x.dtype) * step


def band_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and the smallest entries,
    keeping a band of ``density`` of the entries just below the outliers."""
    n = x.numel()
    a = x.abs().reshape(-1)
    n_top = int(gamma * n)
    n_keep = int(density * n)
    if n_keep <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    order = torch.argsort(a, descending=True)
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    keep[order[n_top:n_top + n_keep]] = True
    return keep.reshape(x.shape)


def elect_sign(mass: torch.Tensor) -> torch.Tensor:
    """TIES sign election from the summed (trimmed) task vectors, in place.

    Entries whose sum is exactly zero take the sign of the whole tensor's sum
    (the paper's majority rule), +1 if that is zero too.
    """
    fallback = 1.0 if float(mass.sum()) >= 0 else -1.0
    sign = torch.sign(mass)
    sign[sign == 0] = fallback
    return sign
