"""Compatibility: the per-request routers' old module path (kept for one release).

The code that lived here is split by job: ``base`` (the ``Router`` interface), ``registry`` (kinds,
``load_router``), ``data`` (labelled examples), ``embedders``, ``similarity`` (centroid, knn), ``classifier``
(Twin-Merging's MLP), ``arrow``, ``lorahub`` (static weights, LoraHub's search) and ``lm_loss``.
Import from those modules (or ``loramerge.routers``).
"""

from __future__ import annotations

from .arrow import ArrowGate, ArrowRouter, top_right_singular_vector
from .base import Router, top_k_softmax
from .classifier import ClassifierRouter, twin_mlp
from .data import label_indices, read_jsonl, task_examples
from .embedders import Embedder, MiniLMEmbedder, PooledHiddenEmbedder, build_embedder, mean_pool
from .lm_loss import ensure_pad_token, lm_batch, per_sample_lm_loss
from .lorahub import LoraHubRouter, StaticRouter, lorahub_search
from .registry import ROUTER_KINDS, load_router
from .similarity import CentroidRouter, NearestNeighbourRouter

__all__ = [
    "ArrowGate", "ArrowRouter", "CentroidRouter", "ClassifierRouter", "Embedder", "LoraHubRouter", "MiniLMEmbedder",
    "NearestNeighbourRouter", "PooledHiddenEmbedder", "ROUTER_KINDS", "Router", "StaticRouter", "build_embedder",
    "ensure_pad_token", "label_indices", "lm_batch", "load_router", "lorahub_search", "mean_pool",
    "per_sample_lm_loss", "read_jsonl", "task_examples", "top_k_softmax", "top_right_singular_vector", "twin_mlp",
]
