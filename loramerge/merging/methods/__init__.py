"""The merge-method registry: each method a typed config plus one pure function per module."""

from __future__ import annotations

import difflib

from loramerge.errors import RecipeError
from loramerge.merging.methods.base import Dense, Factored, MergeMethod, MethodConfig, ModuleInputs, Ref
from loramerge.merging.methods.catalog import BUILTIN_METHODS, FACTORWISE_METHODS, with_factorwise

__all__ = [
    "FACTORWISE_METHODS", "REGISTRY", "Dense", "Factored", "MergeMethod", "MethodConfig", "ModuleInputs", "Ref",
    "get_method", "register_method",
]

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


# The built-in methods (merging/methods/catalog.py): registered explicitly, resolved lazily.
for _method in BUILTIN_METHODS:
    register_method(with_factorwise(_method))
