"""Per-layer gate modules for per-token routing on the gated concatenated LoRA (docs/ARCHITECTURE.md, "The one runtime primitive").

- ``SoftmaxGate`` (X-LoRA style): a learned linear gate per layer on the layer's input, softmax with a
  temperature and optional top-k, over the adapters; ``source="z"`` reads the rank space (CoMoL's router).
- ``FlyTopKGate`` (FlyLoRA style): per adapter, only the top-k rank units by ``|A_t x + d|`` are active;
  the balancing bias ``d`` moves only in training mode (frozen at eval, so inference is deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from loramerge.errors import RecipeError

from .controller import GatedLora
from .core_space import CoreSpaceLayer
from .layers import GatedLoraLayer, GateModule


class SoftmaxGate(GateModule):
    """A learned per-token gate: ``softmax(top_k(W h + b) / T)`` over the routed adapters.

    ``source="x"`` reads the layer's input (X-LoRA style); ``source="z"`` its rank-space projection
    (CoMoL's core-space router on a core-space layer). Weights start at zero: a uniform mixture.
    Adapters the gate does not route pass through with factor 1.
    """

    level = "adapter"

    def __init__(self, in_features: int, routed: Sequence[int], num_adapters: int, *, top_k: int | None = None,
                 temperature: float = 1.0, source: str = "x"):
        super().__init__()
        if source not in ("x", "z"):
            raise RecipeError(f"unknown gate source '{source}'", fix="use 'x' (layer input) or 'z' (rank space)")
        self.proj = nn.Linear(in_features, len(routed))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("routed_index", torch.tensor(list(routed), dtype=torch.long))
        passthrough = torch.ones(num_adapters)
        passthrough[list(routed)] = 0.0
        self.register_buffer("passthrough", passthrough)
        self.in_features, self.num_adapters = in_features, num_adapters
        self.top_k, self.temperature, self.source = top_k, temperature, source

    def spec(self) -> dict:
        return {"type": "softmax", "in_features": self.in_features, "routed": self.routed_index.tolist(),
                "num_adapters": self.num_adapters, "top_k": self.top_k, "temperature": self.temperature,
                "source": self.source}

    def routed_weights(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.proj(h.to(self.proj.weight.dtype))
        k = self.top_k
        if k is not None and k < logits.shape[-1]:
            top, idx = logits.topk(k, dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, top)
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer) -> torch.Tensor:
        weights = self.routed_weights(x if self.source == "x" else z)
        out = self.passthrough.to(weights.dtype).expand(*weights.shape[:-1], self.num_adapters)
        return out.index_copy(-1, self.routed_index, weights)


class FlyTopKGate(GateModule):
    """FlyLoRA's implicit router over each adapter's rank units: keep the top-k of ``|A_t x + d|`` per adapter.

    ``d`` (one entry per rank unit) is the auxiliary-loss-free balancing bias: in training mode each
    forward moves it by ``update_rate * sign(mean count - count)`` within each adapter; at eval it is frozen.
    """

    level = "rank"

    def __init__(self, ranks: Sequence[int], k: int = 8, update_rate: float = 0.01):
        super().__init__()
        self.ranks, self.k, self.update_rate = tuple(ranks), int(k), float(update_rate)
        total, widest = sum(self.ranks), max(self.ranks)
        index = torch.full((len(self.ranks), widest), total, dtype=torch.long)  # padding points at a spare column
        start = 0
        for t, r in enumerate(self.ranks):
            index[t, :r] = torch.arange(start, start + r)
            start += r
        self.register_buffer("unit_index", index)
        self.register_buffer("bias", torch.zeros(total))

    def spec(self) -> dict:
        return {"type": "flylora", "ranks": list(self.ranks), "k": self.k, "update_rate": self.update_rate}

    def mask(self, z: torch.Tensor) -> torch.Tensor:
        """(..., R) 0/1: the top-k units of each adapter block by ``|z + d|``."""
        scores = (z.float() + self.bias).abs()
        spare = torch.full((*scores.shape[:-1], 1), float("-inf"), device=scores.device)
        blocks = torch.cat([scores, spare], dim=-1)[..., self.unit_index]  # (..., T, r_max)
        k = min(self.k, blocks.shape[-1])
        chosen = torch.zeros_like(blocks).scatter(-1, blocks.topk(k, dim=-1).indices, 1.0)
        chosen = chosen.masked_fill(torch.isinf(blocks), 0.0)  # a block narrower than k keeps all its units
        out = torch.zeros(*scores.shape[:-1], scores.shape[-1] + 1, device=scores.device)
        out.scatter_(-1, self.unit_index.expand(*blocks.shape).reshape(*scores.shape[:-1], -1),
                     chosen.reshape(*scores.shape[:-1], -1))
        return out[..., :-1]

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer) -> torch.Tensor:
        mask = self.mask(z)
        if self.training:
            self._balance(mask)
        return mask.to(z.dtype)

    @torch.no_grad()
    def _balance(self, mask: torch.Tensor) -> None:
        counts = mask.reshape(-1, mask.shape[-1]).sum(0)
        padded = torch.cat([counts, counts.new_zeros(1)])[self.unit_index]  # (T, r_max)
        valid = self.unit_index < counts.numel()
        mean = (padded * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        step = torch.sign(mean - padded)[valid]
        self.bias += self.update_rate * step


def gate_from_spec(spec: Mapping[str, Any]) -> GateModule:
    """Rebuild a gate from ``gate.spec()`` (weights are loaded separately)."""
    kind = spec.get("type")
    if kind == "softmax":
        return SoftmaxGate(int(spec["in_features"]), spec["routed"], int(spec["num_adapters"]), top_k=spec["top_k"],
                           temperature=float(spec["temperature"]), source=spec["source"])
    if kind == "flylora":
        return FlyTopKGate(spec["ranks"], int(spec["k"]), float(spec["update_rate"]))
    raise RecipeError(f"unknown gate type '{kind}' in the router artifact", fix="re-create the router artifact")


def softmax_gates(controller: GatedLora, *, top_k: int | None = None, temperature: float = 1.0,
                  adapters: Sequence[str] | None = None) -> dict[str, SoftmaxGate]:
    """One ``SoftmaxGate`` per gated layer (on the layer input; on ``v = Q_A^T x`` for core-space layers)."""
    routed = [controller.index(n) for n in (adapters or controller.adapter_names)]
    gates = {}
    for name, layer in controller.layers.items():
        if layer.kind == "embedding":
            continue
        core = isinstance(layer, CoreSpaceLayer)
        width = layer.core_rank if core else layer.lora_A.shape[1]
        gates[name] = SoftmaxGate(width, routed, controller.num_adapters, top_k=top_k, temperature=temperature,
                                  source="z" if core else "x")
    return gates


def flylora_gates(controller: GatedLora, *, k: int = 8, update_rate: float = 0.01) -> dict[str, FlyTopKGate]:
    """One ``FlyTopKGate`` per gated (concatenated) layer."""
    return {name: FlyTopKGate(layer.ranks, k, update_rate) for name, layer in controller.layers.items()
            if isinstance(layer, GatedLoraLayer)}



__all__ = ["FlyTopKGate", "SoftmaxGate", "flylora_gates", "gate_from_spec", "softmax_gates"]
