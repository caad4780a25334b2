"""loramerge: merge, route and serve LoRA adapters in LoRA's own low-rank space."""

from __future__ import annotations

from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.core.factored import RankPolicy, compress_factored, concat_factors, factored_svd
from loramerge.errors import LoramergeError
from loramerge.merging.engine import MergeResult, merge
from loramerge.merging.methods import REGISTRY, get_method, register_method
from loramerge.merging.recipe import Recipe, load_recipe
from loramerge.version import __version__

__all__ = [
    "REGISTRY", "LoraAdapter", "LoraFactors", "LoramergeError", "MergeResult", "RankPolicy", "Recipe",
    "__version__", "compress_factored", "concat_factors", "factored_svd", "get_method", "load_adapter",
    "load_recipe", "merge", "register_method",
]
