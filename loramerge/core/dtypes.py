"""The one map between dtype names (recipes, CLI options, manifests) and torch dtypes (torch imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loramerge.errors import RecipeError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
OUTPUT_DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""What an adapter or a model is written in (float64 only inside artifacts such as a basis)."""


def to_torch(name: str, *, allowed: tuple[str, ...] = DTYPE_NAMES) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a RecipeError listing the choices."""
    import torch

    if name not in allowed:
        raise RecipeError(f"unknown dtype '{name}'", fix=f"use one of: {', '.join(allowed)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def common_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The inputs' dtype when they agree, else float32 (the ``auto`` output dtype)."""
    import torch

    found = set(dtypes)
    return found.pop() if len(found) == 1 else torch.float32


__all__ = ["DTYPE_NAMES", "OUTPUT_DTYPE_NAMES", "common_dtype", "dtype_name", "to_torch"]
