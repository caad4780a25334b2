"""Routers by embedding similarity: ``CentroidRouter`` (cosine to per-task centroids, top-k softmax) and
``NearestNeighbourRouter`` (similarity-weighted vote of the k nearest training examples)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from loramerge.errors import RecipeError

from .base import Router, top_k_softmax
from .data import label_indices, task_examples
from .embedders import Embedder, require_embedder

if TYPE_CHECKING:
    from .inputs import RouterInputs


def _normalised(embeddings: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    x = embeddings.float()
    if center is not None:
        x = x - center
    return F.normalize(x, dim=-1)


@dataclass(frozen=True)
class CentroidOptions:
    top_k: int | None = 1
    temperature: float = 0.1


class CentroidRouter(Router):
    """Cosine similarity to each task's centroid; top-k softmax with a temperature (top-1 by default).

    Embeddings are centred on the training mean before normalising (``center=True``): LM hidden
    states share a large common direction that otherwise dominates every cosine.
    """

    kind = "centroid"
    Options = CentroidOptions

    def __init__(self, adapter_names, centroids: torch.Tensor, center: torch.Tensor | None, *,
                 top_k: int | None = CentroidOptions.top_k, temperature: float = CentroidOptions.temperature, embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.centroids, self.center = centroids.float(), None if center is None else center.float()
        self.top_k, self.temperature = top_k, temperature

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, center: bool = True,
            top_k: int | None = CentroidOptions.top_k,
            temperature: float = CentroidOptions.temperature) -> CentroidRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = embeddings if embeddings is not None else require_embedder(embedder).embed(texts)
        mean = E.float().mean(0) if center else None
        X = _normalised(E, mean)
        centroids = torch.zeros(len(names), X.shape[1])
        centroids.index_add_(0, y, X)
        empty = [names[i] for i in range(len(names)) if not (y == i).any()]
        if empty:
            raise RecipeError(f"no training example for adapter '{empty[0]}'", fix="give examples for every adapter")
        return cls(names, F.normalize(centroids, dim=-1), mean, top_k=top_k, temperature=temperature,
                   embedder=embedder)

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: CentroidOptions) -> CentroidRouter:
        examples = inputs.examples(cls.kind)
        embedder, names = inputs.features()
        return cls.fit(examples, embedder, adapter_names=names, top_k=options.top_k,
                       temperature=options.temperature)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return _normalised(embeddings, self.center) @ self.centroids.T

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return top_k_softmax(self.scores(embeddings), self.top_k, self.temperature)

    def _state(self):
        tensors = {"centroids": self.centroids}
        if self.center is not None:
            tensors["center"] = self.center
        return {"top_k": self.top_k, "temperature": self.temperature}, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["centroids"], tensors.get("center"), top_k=config["top_k"],
                   temperature=config["temperature"], embedder=embedder, embedder_spec=embedder_spec)


@dataclass(frozen=True)
class NearestNeighbourOptions:
    top_k: int = 8
    """k, the number of neighbours that vote."""


class NearestNeighbourRouter(Router):
    """The k nearest training examples by cosine vote; weights = vote shares (similarity-weighted)."""

    kind = "knn"
    Options = NearestNeighbourOptions

    def __init__(self, adapter_names, keys: torch.Tensor, labels: torch.Tensor, center: torch.Tensor | None, *,
                 k: int = NearestNeighbourOptions.top_k, embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.keys, self.labels, self.center, self.k = keys.float(), labels.long(), center, k

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, center: bool = True,
            k: int = NearestNeighbourOptions.top_k) -> NearestNeighbourRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = embeddings if embeddings is not None else require_embedder(embedder).embed(texts)
        mean = E.float().mean(0) if center else None
        return cls(names, _normalised(E, mean), y, mean, k=k, embedder=embedder)

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: NearestNeighbourOptions) -> NearestNeighbourRouter:
        examples = inputs.examples(cls.kind)
        embedder, names = inputs.features()
        return cls.fit(examples, embedder, adapter_names=names, k=options.top_k)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        sims = _normalised(embeddings, self.center) @ self.keys.T
        k = min(self.k, self.keys.shape[0])
        top, idx = sims.topk(k, dim=-1)
        votes = torch.zeros(sims.shape[0], self.num_adapters)
        votes.scatter_add_(1, self.labels[idx], top.clamp_min(0.0) + 1e-6)
        return votes / votes.sum(-1, keepdim=True)

    def _state(self):
        tensors = {"keys": self.keys, "labels": self.labels}
        if self.center is not None:
            tensors["center"] = self.center
        return {"k": self.k}, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["keys"], tensors["labels"], tensors.get("center"), k=config["k"],
                   embedder=embedder, embedder_spec=embedder_spec)


__all__ = ["CentroidOptions", "CentroidRouter", "NearestNeighbourOptions", "NearestNeighbourRouter"]
