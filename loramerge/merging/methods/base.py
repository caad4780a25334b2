"""What a merge method is: a typed, frozen config plus one pure function per module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from loramerge.core.adapter import LoraFactors
from loramerge.core.factored import RankPolicy

MethodKind = Literal["factored", "elementwise"]
CALIBRATION_KINDS = ("gram", "fisher", "model")


class MethodConfig(BaseModel):
    """Base for method parameters: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


@dataclass(frozen=True)
class ModuleInputs:
    """Everything a method sees for one module: the factors of the adapters that have it."""

    name: str
    factors: tuple[LoraFactors, ...]
    weights: tuple[float, ...]
    adapter_names: tuple[str, ...]
    seed: int = 0
    context: Any = None
    """Whatever the method's ``prepare`` pass returned (e.g. a global threshold), else None."""

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.factors]

    def weighted(self) -> Sequence[tuple[LoraFactors, float]]:
        return list(zip(self.factors, self.weights))


@dataclass(frozen=True)
class Factored:
    """A result still in low-rank form: ``delta = B @ A``."""

    B: torch.Tensor
    A: torch.Tensor


@dataclass(frozen=True)
class Dense:
    """A result formed densely (element-wise methods); brought back to low rank by the rank policy."""

    delta: torch.Tensor


MethodResult = Factored | Dense
MethodFn = Callable[[MethodConfig, ModuleInputs], MethodResult]
PrepareFn = Callable[[MethodConfig, Callable[[], Iterator[ModuleInputs]]], Any]
"""A pass over every module before merging (for global statistics such as a model-wide top-k
threshold); it gets a function that yields each module's inputs and returns the shared context."""


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry. ``paper`` and ``url`` go into the model card."""

    name: str
    config_cls: type[MethodConfig]
    fn: MethodFn
    kind: MethodKind
    exact: bool
    paper: str
    url: str
    summary: str
    factorwise: MethodFn | None = None
    prepare: PrepareFn | None = None
    fixed_rank: RankPolicy | None = None
    data: str = "none"
    """What the method learns from: "none", calibration statistics ("gram", "fisher": the recipe's
    ``calibration:`` / ``data:``; "model": computed from ``data:`` on the partially merged model), or "prompts" (coefficients learned beforehand, e.g. by ``loramerge
    adamerging``, and given as parameters)."""
    aliases: tuple[str, ...] = ()

    @property
    def needs_calibration(self) -> bool:
        """True when the engine must load calibration statistics for it (``CALIBRATION_KINDS``)."""
        return self.data in CALIBRATION_KINDS

    def make_config(self, parameters: dict | None) -> MethodConfig:
        return self.config_cls(**(parameters or {}))
