"""Routing over LoRA adapters, on one runtime primitive: the gated concatenated LoRA.

``y = W0 x + B_cat (c * (A_cat x))`` per target module, with a gate ``c`` on the rank dimension set per
request (centroid, nearest-neighbour, Twin-Merging classifier, LoraHub, Arrow per request) or computed per
token (Arrow, X-LoRA-style softmax gates, CoMoL-style core space, FlyLoRA rank-wise top-k).
The core (``loramerge``) never imports this package. Where things live: ``layers`` / ``controller`` /
``gated`` (the primitive), ``base`` (the ``Router`` interface), ``registry`` (every router kind, in one place),
one module per router family (``similarity``, ``classifier``, ``arrow``, ``lorahub``, ``moe`` with ``gates``,
``core_space``, ``gate_training``), ``task_layer`` (AdaMerging's tasks x layers gates), ``cli`` (``route``).
"""

from __future__ import annotations

from .arrow import ArrowRouter
from .base import Router
from .classifier import ClassifierRouter
from .data import task_examples
from .embedders import MiniLMEmbedder, PooledHiddenEmbedder
from .gated import GatedLora, GateModule, attach_gated_lora, attach_twin, load_adapters
from .generate import RoutedGeneration, generate_routed
from .lorahub import LoraHubRouter, StaticRouter, lorahub_search
from .registry import ROUTERS, load_router
from .similarity import CentroidRouter, NearestNeighbourRouter

__all__ = [
    "ArrowRouter", "CentroidRouter", "ClassifierRouter", "GateModule", "GatedLora", "LoraHubRouter", "MiniLMEmbedder",
    "NearestNeighbourRouter", "PooledHiddenEmbedder", "ROUTERS", "RoutedGeneration", "Router", "StaticRouter",
    "attach_gated_lora", "attach_twin", "generate_routed", "load_adapters", "load_router", "lorahub_search",
    "task_examples",
]
