"""Routed generation with transformers: a router picks each prompt's composition, one ``generate`` call per batch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.errors import RecipeError

from .base import Router
from .controller import GatedLora, WeightsLike
from .lm_loss import decode, ensure_pad_token, tokenize


@dataclass
class RoutedGeneration:
    """The generated continuations and the composition each prompt ran with."""

    texts: list[str]
    sequences: torch.Tensor
    weights: torch.Tensor | None
    """(batch, N) weights over ``adapter_names``; None when a per-token router decided inside the forward."""
    adapter_names: list[str]

    def compositions(self) -> list[dict[str, float]] | None:
        if self.weights is None:
            return None
        return [{n: float(w) for n, w in zip(self.adapter_names, row, strict=True) if float(w) != 0.0}
                for row in self.weights]


def generate_routed(
    controller: GatedLora,
    tokenizer,
    prompts: Sequence[str],
    router: Router | None = None,
    *,
    weights: WeightsLike = None,
    max_new_tokens: int = 32,
    **generate_kwargs,
) -> RoutedGeneration:
    """Generate for a batch of prompts, each with the composition ``router`` chooses (or ``weights``).

    Per-request routers set one row of gate weights per prompt; per-token routers (Arrow, MoE gates)
    install their gates for the call. The batch runs as one ``model.generate`` (left padding);
    ``num_return_sequences`` / beams expand each prompt's gate with it.
    """
    if router is not None and weights is not None:
        raise RecipeError("give a router or weights, not both", fix="drop one of router= / weights=")
    prompts = list(prompts)
    if not prompts:
        return RoutedGeneration([], torch.empty(0, 0, dtype=torch.long), None, list(controller.adapter_names))
    ensure_pad_token(tokenizer)
    if router is not None and hasattr(router, "bind") and getattr(router, "tokenizer", None) is None:
        router.bind(controller, tokenizer)
    if router is not None:
        context = router.applied(controller, prompts)
    elif weights is not None:
        context = _weights_context(controller, weights)
    else:
        context = contextlib.nullcontext(None)
    model = controller.model
    device = next(model.parameters()).device
    batch = tokenize(tokenizer, prompts, padding=True, padding_side="left", return_tensors="pt").to(device)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with torch.no_grad(), context as used:
        sequences = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
    new_tokens = sequences[:, batch["input_ids"].shape[1]:]
    texts = decode(tokenizer, new_tokens, skip_special_tokens=True)
    return RoutedGeneration(texts=texts, sequences=new_tokens, weights=used, adapter_names=list(controller.adapter_names))


@contextlib.contextmanager
def _weights_context(controller: GatedLora, weights: WeightsLike):
    with controller.use_weights(weights):
        yield controller.current_weights()


__all__ = ["RoutedGeneration", "generate_routed"]
