"""LiNeS (Wang et al., ICLR 2025, arXiv 2410.17146): layer-increasing scaling of a merged delta.

The delta of block l (1..L) is scaled by ``alpha + beta (l - 1) / (L - 1)``: shallow layers stay near the base,
deep layers keep the task. Data-free; exact on a factored result (B is scaled). ``method: lines`` is task
arithmetic followed by it; ``post: lines`` (or ``post: {lines: {alpha: .., beta: ..}}``) applies it after any
method. Torch-free at import (recipes validate ``post:`` without loading torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pydantic import Field

from loramerge.errors import RecipeError
from loramerge.merging.methods.base import Dense, Factored, MethodConfig, MethodResult, ModuleInputs

_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """The block index in a module name (``model.layers.7.mlp.up_proj`` -> 7), None outside the blocks."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


class LinesConfig(MethodConfig):
    alpha: float = Field(0.5, description="scale of the first layer's delta")
    beta: float = Field(0.5, description="added to the scale linearly with depth: the last layer gets alpha + beta")
    num_layers: int | None = Field(None, ge=1, description="layers in the model (default: the deepest index + 1)")


def lines_factor(cfg: LinesConfig, module: str, num_layers: int) -> float:
    """LiNeS: ``alpha + beta (l - 1) / (L - 1)`` for block l = 1..L; embeddings count as the first layer,
    other modules outside the blocks (the LM head) as the last."""
    index = layer_index(module)
    if index is None:
        index = 0 if "embed" in module else num_layers - 1
    return cfg.alpha + cfg.beta * (index / (num_layers - 1) if num_layers > 1 else 1.0)


def num_layers_of(modules: Sequence[str]) -> int:
    indices = [i for i in map(layer_index, modules) if i is not None]
    return max(indices) + 1 if indices else 1


def scale_result(result: MethodResult, factor: float) -> MethodResult:
    """Scale a merged delta exactly (B for a factored one)."""
    if isinstance(result, Factored):
        return Factored(B=result.B * factor, A=result.A)
    return Dense(delta=result.delta * factor)


def lines_prepare(cfg: LinesConfig, modules: Callable[[], Iterator[ModuleInputs]]) -> int:
    return cfg.num_layers or num_layers_of([m.name for m in modules()])


def lines(cfg: LinesConfig, inputs: ModuleInputs) -> Factored:
    """Task arithmetic (the weighted sum) scaled per layer by LiNeS: exact, factored."""
    from loramerge.core.factored import concat_factors  # torch: only when a merge runs

    B, A = concat_factors(inputs.factors, list(inputs.weights))
    num_layers = inputs.context or cfg.num_layers or num_layers_of([inputs.name])
    return Factored(B=B * lines_factor(cfg, inputs.name, num_layers), A=A)


@dataclass(frozen=True)
class PostStep:
    """A step applied to every module's merged delta (the recipe's ``post:``), e.g. LiNeS."""

    name: str
    cfg: LinesConfig
    num_layers: int

    def __call__(self, module: str, result: MethodResult) -> MethodResult:
        return scale_result(result, lines_factor(self.cfg, module, self.num_layers))


def build_post(spec: str | dict | None, modules: Sequence[str]) -> PostStep | None:
    """``post: lines`` or ``post: {lines: {alpha: .., beta: ..}}`` -> a PostStep (None when absent)."""
    if spec is None:
        return None
    name, params = (spec, {}) if isinstance(spec, str) else next(iter(spec.items())) if len(spec) == 1 else ("", {})
    if name != "lines":
        raise RecipeError(f"unknown post-step {spec!r}", fix="use `post: lines` or `post: {lines: {alpha: 0.5, beta: 0.5}}`")
    cfg = LinesConfig(**(params or {}))
    return PostStep("lines", cfg, cfg.num_layers or num_layers_of(modules))


__all__ = ["LinesConfig", "PostStep", "build_post", "layer_index", "lines", "lines_factor", "lines_prepare",
           "num_layers_of", "scale_result"]
