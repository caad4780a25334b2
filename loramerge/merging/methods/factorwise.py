"""PEFT-compatible factor-wise merges (``factorwise: true``).

PEFT's ``add_weighted_adapter`` with ``linear``, ``ties``, ``dare_linear``,
``dare_ties`` or ``magnitude_prune`` combines the A matrices with each other
and the B matrices with each other, each weighted by sqrt(|w * scale|) (the
sign on A only). The product (sum sqrt(w) B)(sum sqrt(w) A) has cross terms
B_i A_j, so it is NOT a weighted sum of the adapters. It is offered only to
reproduce results made with PEFT; the default product-space methods are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from loramerge.core.ops import bernoulli_mask, generator_for, magnitude_mask
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs

Combine = Callable[[list[torch.Tensor], list[float], torch.Generator], torch.Tensor]


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * x for x, w in zip(tensors, weights))


def _disjoint_mean(tensors: list[torch.Tensor], weights: list[float], majority_sign: str) -> torch.Tensor:
    """PEFT's rule: elect from the unweighted tensors (ties -> +1), average agreeing weighted values by count."""
    stacked = torch.stack(tensors)
    votes = stacked.sign().sum(0) if majority_sign == "frequency" else stacked.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _pruned_magnitude(tensors: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    if density >= 1.0:
        return tensors
    return [x * magnitude_mask(x, density) for x in tensors]


def _pruned_random(tensors: list[torch.Tensor], density: float, gen: torch.Generator) -> list[torch.Tensor]:
    if density >= 1.0:
        return tensors
    return [x * bernoulli_mask(x.shape, density, gen, device=x.device) / density for x in tensors]


def _combiner(method: str, cfg: MethodConfig) -> Combine:
    density = getattr(cfg, "density", 1.0)
    sign_rule = getattr(cfg, "majority_sign", "total")
    table: dict[str, Combine] = {
        "task_arithmetic": lambda xs, ws, g: _weighted_sum(xs, ws),
        "magnitude_prune": lambda xs, ws, g: _weighted_sum(_pruned_magnitude(xs, density), ws),
        "ties": lambda xs, ws, g: _disjoint_mean(_pruned_magnitude(xs, density), ws, sign_rule),
        "dare_linear": lambda xs, ws, g: _weighted_sum(_pruned_random(xs, density, g), ws),
        "dare_ties": lambda xs, ws, g: _disjoint_mean(_pruned_random(xs, density, g), ws, sign_rule),
    }
    return table[method]


def factorwise(method: str) -> Callable[[MethodConfig, ModuleInputs], Factored]:
    """The factor-wise (PEFT) variant of ``method``."""

    def run(cfg: MethodConfig, inputs: ModuleInputs) -> Factored:
        # An adapter without the module arrives as rank-0 factors (a zero task vector); in factor space its
        # zero A and B add nothing to any combiner (sum, sign election, disjoint mean), so it is left out.
        present = [i for i, f in enumerate(inputs.factors) if f.rank]
        inputs = replace(inputs, factors=tuple(inputs.factors[i] for i in present),
                         weights=tuple(inputs.weights[i] for i in present),
                         adapter_names=tuple(inputs.adapter_names[i] for i in present))
        ranks = set(inputs.ranks)
        if len(ranks) != 1:
            raise ValueError(
                f"factorwise merging needs equal ranks, got {sorted(ranks)} (as PEFT does); "
                "use the default product-space method, which handles mixed ranks exactly"
            )
        lam = getattr(cfg, "lambda_", 1.0)
        w_A, w_B = [], []
        for f, w in zip(inputs.factors, inputs.weights):
            ws = lam * w * f.scale
            w_A.append(math.copysign(math.sqrt(abs(ws)), ws))
            w_B.append(math.sqrt(abs(ws)))
        raw_A = [f.A for f in inputs.factors]
        raw_B = [f.B / f.scale for f in inputs.factors]
        combine = _combiner(method, cfg)
        gen = generator_for(inputs.seed, "factorwise", inputs.name, device=inputs.factors[0].A.device)
        A = combine(raw_A, w_A, gen)
        B = combine(raw_B, w_B, gen)
        return Factored(B=B, A=A)

    return run
