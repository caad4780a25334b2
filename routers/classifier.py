"""Twin-Merging's per-request router: ``w = softmax(MLP(pooled hidden state))`` (``ClassifierRouter``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router
from .data import label_indices, task_examples
from .embedders import Embedder, require_embedder

if TYPE_CHECKING:
    from .inputs import RouterInputs


def twin_mlp(dim: int, num_tasks: int, *, hidden_mult: int = 2, dropout: float = 0.5) -> nn.Sequential:
    """Twin-Merging's router: emb -> 2emb (BN, LeakyReLU, dropout) -> 2emb (BN, LeakyReLU, dropout) -> T."""
    hidden = hidden_mult * dim
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_tasks),
    )


@dataclass(frozen=True)
class ClassifierOptions:
    epochs: int = 50
    lr: float = 5e-4


class ClassifierRouter(Router):
    """Twin-Merging's per-request router: ``w = softmax(MLP(pooled hidden state))``.

    Defaults are the paper's code: hidden 2*emb, dropout 0.5, Adam lr 5e-4, batch 1024, 50 epochs.
    Inputs are standardised with the training mean/std (``standardize=True``; our addition, which
    makes the fixed learning rate work across embedders whose scales differ by orders of magnitude).
    """

    kind = "classifier"
    Options = ClassifierOptions

    def __init__(self, adapter_names, mlp: nn.Sequential, mean: torch.Tensor, std: torch.Tensor, config: dict, *,
                 embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.mlp, self.mean, self.std, self.config = mlp.eval(), mean.float(), std.float(), dict(config)

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, hidden_mult: int = 2, dropout: float = 0.5,
            lr: float = ClassifierOptions.lr, batch_size: int = 1024, epochs: int = ClassifierOptions.epochs, weight_decay: float = 0.0, standardize: bool = True,
            seed: int = 0) -> ClassifierRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = (embeddings if embeddings is not None else require_embedder(embedder).embed(texts)).float()
        mean = E.mean(0) if standardize else torch.zeros(E.shape[1])
        std = E.std(0).clamp_min(1e-6) if standardize and E.shape[0] > 1 else torch.ones(E.shape[1])
        X = (E - mean) / std
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            mlp = twin_mlp(X.shape[1], len(names), hidden_mult=hidden_mult, dropout=dropout)
            optimizer = torch.optim.Adam(mlp.parameters(), lr=lr, weight_decay=weight_decay)
            mlp.train()
            for _ in range(epochs):
                order = torch.randperm(X.shape[0], generator=gen)
                for start in range(0, X.shape[0], batch_size):
                    idx = order[start:start + batch_size]
                    if idx.numel() < 2:  # BatchNorm needs two samples
                        continue
                    loss = F.cross_entropy(mlp(X[idx]), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        config = {"dim": X.shape[1], "hidden_mult": hidden_mult, "dropout": dropout, "lr": lr,
                  "batch_size": batch_size, "epochs": epochs, "weight_decay": weight_decay, "seed": seed,
                  "standardize": standardize, "examples": X.shape[0]}
        return cls(names, mlp, mean, std, config, embedder=embedder)

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: ClassifierOptions) -> ClassifierRouter:
        examples = inputs.examples(cls.kind)
        embedder, names = inputs.features()
        return cls.fit(examples, embedder, adapter_names=names, epochs=options.epochs, lr=options.lr,
                       seed=inputs.seed)

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlp((embeddings.float() - self.mean) / self.std)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(embeddings), dim=-1)

    def _state(self):
        tensors = {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}
        return dict(self.config), {**tensors, "mean": self.mean, "std": self.std}

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        mlp = twin_mlp(int(config["dim"]), len(adapter_names), hidden_mult=int(config["hidden_mult"]),
                       dropout=float(config["dropout"]))
        mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        return cls(adapter_names, mlp, tensors["mean"], tensors["std"], config, embedder=embedder,
                   embedder_spec=embedder_spec)


__all__ = ["ClassifierOptions", "ClassifierRouter", "twin_mlp"]
