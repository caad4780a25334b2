"""loramerge: merge, route and serve LoRA adapters in LoRA's own low-rank space.

The public API is imported on first use (PEP 562), so ``import loramerge`` and the CLI's ``--help`` do
not pay for torch: ``loramerge.merge``, ``loramerge.load_adapter``, ``loramerge.REGISTRY``, ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loramerge.version import __version__

_EXPORTS: dict[str, str] = {
    "AdapterSet": "loramerge.core.adapter_set",
    "LoraAdapter": "loramerge.core.adapter",
    "LoraFactors": "loramerge.core.adapter",
    "load_adapter": "loramerge.core.adapter",
    "RankPolicy": "loramerge.core.rank",
    "compress_factored": "loramerge.core.factored",
    "concat_factors": "loramerge.core.factored",
    "factored_svd": "loramerge.core.factored",
    "LoramergeError": "loramerge.errors",
    "MergeResult": "loramerge.merging.engine",
    "merge": "loramerge.merging.engine",
    "REGISTRY": "loramerge.merging.methods",
    "get_method": "loramerge.merging.methods",
    "register_method": "loramerge.merging.methods",
    "Recipe": "loramerge.merging.recipe",
    "load_recipe": "loramerge.merging.recipe",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loramerge' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
    from loramerge.core.adapter_set import AdapterSet
    from loramerge.core.factored import compress_factored, concat_factors, factored_svd
    from loramerge.core.rank import RankPolicy
    from loramerge.errors import LoramergeError
    from loramerge.merging.engine import MergeResult, merge
    from loramerge.merging.methods import REGISTRY, get_method, register_method
    from loramerge.merging.recipe import Recipe, load_recipe

__all__ = [
    "REGISTRY", "AdapterSet", "LoraAdapter", "LoraFactors", "LoramergeError", "MergeResult", "RankPolicy", "Recipe",
    "__version__", "compress_factored", "concat_factors", "factored_svd", "get_method", "load_adapter",
    "load_recipe", "merge", "register_method",
]
