"""What a merge method is: a typed, frozen config plus one pure function per module."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from loramerge.core.rank import RankPolicy

if TYPE_CHECKING:
    import torch

    from loramerge.core.adapter import LoraFactors

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
    """A result formed densely (element-wise methods); brought back to low rank by the rank policy.

    ``basis`` (optional, d_in x k, orthonormal columns): a subspace likely to hold the result's top row space,
    e.g. the inputs' stacked ``A`` rows; the randomized SVD starts from it instead of a random sketch.
    """

    delta: torch.Tensor
    basis: torch.Tensor | None = None


MethodResult = Factored | Dense
MethodFn = Callable[[MethodConfig, ModuleInputs], MethodResult]
PrepareFn = Callable[[MethodConfig, Callable[[], Iterator[ModuleInputs]]], Any]
"""A pass over every module before merging (for global statistics such as a model-wide top-k
threshold); it gets a function that yields each module's inputs and returns the shared context."""


class Ref:
    """A reference ``"package.module:attribute"`` imported on first use.

    The built-in catalog names each method's function and config class this way, so listing the
    registry (``loramerge methods``) never imports torch. A Ref calls through and forwards attribute
    access (``ref.model_fields``) to what it names; ``args`` make it call a factory once with them.
    """

    def __init__(self, target: str, *args: Any):
        self.target, self.args = target, args
        self._obj: Any = None

    def resolve(self) -> Any:
        if self._obj is None:
            module, _, attr = self.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._obj = obj(*self.args) if self.args else obj
        return self._obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("target", "args", "_obj"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"Ref({self.target!r}{''.join(f', {a!r}' for a in self.args)})"


def resolve(obj: Any) -> Any:
    """``obj`` itself, or what a Ref names."""
    return obj.resolve() if isinstance(obj, Ref) else obj


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry. ``paper`` and ``url`` go into the model card.

    ``config_cls``, ``fn``, ``factorwise`` and ``prepare`` may be :class:`Ref`s (the built-in catalog's
    form: resolved on first use) or the objects themselves (what a plugin passes to ``register_method``).
    """

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

    def parameters(self) -> dict[str, Any]:
        """Parameter name -> default (imports the method's module)."""
        return {name: "(required)" if f.is_required() else f.default
                for name, f in resolve(self.config_cls).model_fields.items()}
