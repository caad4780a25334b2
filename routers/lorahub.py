"""Static weights, and LoraHub (Huang et al., COLM 2024): task weights found by gradient-free search.

``lorahub_search``: a seeded evolution strategy over the weights from a handful of examples;
loss = LM loss + 0.05 * mean |w|; the whole population runs in one batch with per-sample gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loramerge.errors import RecipeError

from .base import Router
from .controller import GatedLora
from .lm_loss import lm_batch, per_sample_lm_loss

if TYPE_CHECKING:
    from .inputs import RouterInputs


class StaticRouter(Router):
    """The same weights for every prompt (a fixed mixture, or what LoraHub found for a task)."""

    kind = "static"

    def __init__(self, adapter_names, weights: torch.Tensor, config: dict | None = None):
        super().__init__(adapter_names, None, {"kind": "none"})
        self.weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if self.weights.numel() != self.num_adapters:
            raise RecipeError(f"{self.weights.numel()} weights for {self.num_adapters} adapters",
                              fix="give one weight per adapter")
        self.config = dict(config or {})

    def route_weights(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.weights.expand(len(prompts), -1).clone()

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.weights.expand(embeddings.shape[0], -1).clone()

    def _state(self):
        return dict(self.config), {"weights": self.weights}

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["weights"], config)


@dataclass(frozen=True)
class LoraHubOptions:
    budget: int = 40
    """Loss evaluations (the paper's default)."""


class LoraHubRouter(StaticRouter):
    """LoraHub (Huang et al., COLM 2024): task weights found by gradient-free search on a few examples.

    Product space by default: the weights gate the concatenated LoRA (exact ``sum_i w_i B_i A_i``),
    not the paper code's factor-wise ``(sum w B)(sum w A)``.
    """

    kind = "lorahub"
    Options = LoraHubOptions

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: LoraHubOptions) -> LoraHubRouter:
        """Search on ``{"input", "output"}`` (or ``{"text"}``) examples of the new task."""
        model, tokenizer = inputs.base("LoraHub")
        return lorahub_search(inputs.controller(model), tokenizer, inputs.pairs(), budget=options.budget,
                              seed=inputs.seed)


@torch.no_grad()
def lorahub_search(
    controller: GatedLora,
    tokenizer,
    examples: Sequence[Any],
    *,
    budget: int = LoraHubOptions.budget,
    population: int = 8,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    sigma: float = 0.5,
    seed: int = 0,
    max_length: int = 256,
    adapter_names: Sequence[str] | None = None,
) -> LoraHubRouter:
    """LoraHub's weight search, product space, without nevergrad.

    A seeded (mu/mu, lambda) evolution strategy from w = 0 with a success-based step size; ``budget``
    counts loss evaluations (the paper's default is 40). Loss = mean LM cross-entropy on the examples'
    outputs + ``l1 * mean |w|``. Each generation's candidates run as one batch with per-sample gates.
    """
    names = list(adapter_names) if adapter_names is not None else list(controller.adapter_names)
    for n in names:
        controller.index(n)
    if not examples:
        raise RecipeError("LoraHub needs a few examples", fix="pass (input, output) pairs of the new task")
    ids, mask, labels = lm_batch(tokenizer, examples, max_length)
    device = next(controller.model.parameters()).device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    low, high = bounds
    gen = torch.Generator().manual_seed(seed)
    n_ex, dim = ids.shape[0], len(names)

    def evaluate(candidates: torch.Tensor) -> torch.Tensor:
        rows = controller.routed(candidates.repeat_interleave(n_ex, 0), names)
        with controller.use_weights(rows):
            logits = controller.model(input_ids=ids.repeat(len(candidates), 1),
                                      attention_mask=mask.repeat(len(candidates), 1)).logits
        lm = per_sample_lm_loss(logits, labels.repeat(len(candidates), 1)).view(len(candidates), n_ex).mean(1)
        return lm.cpu() + l1 * candidates.abs().mean(1)

    mean = torch.zeros(dim)
    best_w, best_loss = mean.clone(), float(evaluate(mean[None])[0])
    history = [best_loss]
    used, step = 1, sigma
    while used < budget:
        lam = min(population, budget - used)
        candidates = (mean + step * torch.randn(lam, dim, generator=gen)).clamp(low, high)
        losses = evaluate(candidates)
        used += lam
        order = losses.argsort()
        if float(losses[order[0]]) < best_loss:
            best_loss, best_w = float(losses[order[0]]), candidates[order[0]].clone()
            step *= 1.3
        else:
            step *= 0.7
        elite = candidates[order[: max(1, lam // 2)]]
        mean = elite.mean(0)
        history.extend(losses.tolist())
    config = {"budget": budget, "population": population, "bounds": list(bounds), "l1": l1, "sigma": sigma,
              "seed": seed, "examples": n_ex, "best_loss": best_loss, "initial_loss": history[0]}
    router = LoraHubRouter(names, best_w, config)
    router.history = history
    return router


__all__ = ["LoraHubOptions", "LoraHubRouter", "StaticRouter", "lorahub_search"]
