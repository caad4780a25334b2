"""loramerge: merge, route and serve LoRA adapters in LoRA's own low-rank space."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import LoraAdapter, LoraFactors, load_adapter  # noqa: E402
from .errors import LoramergeError  # noqa: E402
from .factored import RankPolicy, compress_factored, concat_factors, factored_svd  # noqa: E402
from .merge import MergeResult, merge  # noqa: E402
from .methods import REGISTRY, get_method, register_method  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "REGISTRY", "LoraAdapter", "LoraFactors", "LoramergeError", "MergeResult", "RankPolicy", "Recipe",
    "__version__", "compress_factored", "concat_factors", "factored_svd", "get_method", "load_adapter",
    "load_recipe", "merge", "register_method",
]
