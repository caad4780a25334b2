"""Routing over LoRA adapters, on one runtime primitive: the gated concatenated LoRA.

``y = W0 x + B_cat (c * (A_cat x))`` per target module, with a gate ``c`` on the rank dimension set per
request (centroid, nearest-neighbour, Twin-Merging classifier, LoraHub, Arrow per request) or computed per
token (Arrow, X-LoRA-style softmax gates, CoMoL-style core space, FlyLoRA rank-wise top-k).
The core (``loramerge``) never imports this package.
"""

from __future__ import annotations

from .gated import GatedLora, GateModule, attach_gated_lora, attach_twin, load_adapters
from .generate import RoutedGeneration, generate_routed
from .request import (
    ArrowRouter,
    CentroidRouter,
    ClassifierRouter,
    LoraHubRouter,
    MiniLMEmbedder,
    NearestNeighbourRouter,
    PooledHiddenEmbedder,
    Router,
    StaticRouter,
    load_router,
    lorahub_search,
    task_examples,
)

__all__ = [
    "ArrowRouter", "CentroidRouter", "ClassifierRouter", "GateModule", "GatedLora", "LoraHubRouter", "MiniLMEmbedder",
    "NearestNeighbourRouter", "PooledHiddenEmbedder", "RoutedGeneration", "Router", "StaticRouter",
    "attach_gated_lora", "attach_twin", "generate_routed", "load_adapters", "load_router", "lorahub_search",
    "task_examples",
]
