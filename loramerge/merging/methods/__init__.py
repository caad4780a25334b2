"""The merge-method registry: each method a typed config plus one pure function per module."""

from __future__ import annotations

import difflib

from loramerge.errors import RecipeError
from loramerge.merging.methods.adamerging import ADAMERGING
from loramerge.merging.methods.base import Dense, Factored, MergeMethod, MethodConfig, ModuleInputs
from loramerge.merging.methods.data import FISHER, LINES, REGMEAN, REGMEAN_PLUS
from loramerge.merging.methods.elementwise import BREADCRUMBS, DARE_LINEAR, DARE_TIES, DELLA, MAGNITUDE_PRUNE, TIES
from loramerge.merging.methods.factorwise import FACTORWISE_METHODS, factorwise
from loramerge.merging.methods.knots import KNOTS
from loramerge.merging.methods.lego import LORA_LEGO
from loramerge.merging.methods.linear import AVERAGE, CAT, TASK_ARITHMETIC
from loramerge.merging.methods.spectral import ISO_C, ISO_CTS, STAR, TSV

__all__ = ["Dense", "Factored", "MergeMethod", "MethodConfig", "ModuleInputs", "REGISTRY", "get_method", "register_method"]

REGISTRY: dict[str, MergeMethod] = {}
_ALIASES: dict[str, str] = {}


def register_method(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Add a method (also the seam for third-party methods)."""
    for name in (method.name, *method.aliases):
        if not replace and (name in REGISTRY or name in _ALIASES):
            raise ValueError(f"merge method '{name}' is already registered")
    REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def get_method(name: str) -> MergeMethod:
    key = _ALIASES.get(name, name)
    if key not in REGISTRY:
        close = difflib.get_close_matches(name, [*REGISTRY, *_ALIASES], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"unknown merge method '{name}'",
                          fix=f"{hint}run `loramerge methods` for the list: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def _with_factorwise(method: MergeMethod) -> MergeMethod:
    from dataclasses import replace

    return replace(method, factorwise=factorwise(method.name)) if method.name in FACTORWISE_METHODS else method


# Built-in methods, one group per file. Add a new file's group here (explicit, no import side effects).
_BUILTIN_GROUPS: tuple[tuple[MergeMethod, ...], ...] = (
    (TASK_ARITHMETIC, AVERAGE, CAT),
    (TIES, DARE_LINEAR, DARE_TIES, DELLA, BREADCRUMBS, MAGNITUDE_PRUNE),
    (LORA_LEGO,),
    (TSV, ISO_C, ISO_CTS, STAR, KNOTS),
    (ADAMERGING,),
    (REGMEAN, REGMEAN_PLUS, FISHER, LINES),
)

for _group in _BUILTIN_GROUPS:
    for _method in _group:
        register_method(_with_factorwise(_method))
