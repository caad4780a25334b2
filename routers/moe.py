"""Per-token mixtures of LoRA experts as a router artifact: ``GateRouter`` (docs/ARCHITECTURE.md, "The one runtime primitive").

A set of per-layer gates (``gates.py``: X-LoRA-style softmax, FlyLoRA top-k; on gated or core-space
layers, ``core_space.py``) trained by ``gate_training.train_gates``, saved with the adapter names it routes.
The gate classes and helpers that used to live here are re-exported under their old names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loramerge.errors import LoramergeError, RecipeError

from .base import Router
from .controller import GatedLora
from .core_space import CoreSpaceLayer, attach_core_space, core_space
from .gate_training import (
    _gates_in_training,
    adapter_mass,
    all_routed,
    gates_in_training,
    recorded_gates,
    train_gates,
)
from .gates import FlyTopKGate, SoftmaxGate, flylora_gates, gate_from_spec, softmax_gates
from .layers import GateModule
from .lm_loss import ensure_pad_token, tokenize

if TYPE_CHECKING:
    from .inputs import RouterInputs

_all_routed = all_routed  # old private name (benchmarks/quality)


@dataclass(frozen=True)
class GateOptions:
    top_k: int | None = None
    """Adapters kept per token (None: all, a plain softmax)."""
    temperature: float = 1.0
    epochs: int = 3
    lr: float = 1e-2
    space: str = "gated"
    """``"gated"`` (X-LoRA-style gate on the layer input) or ``"core"`` (CoMoL-style core space)."""


class GateRouter(Router):
    """A set of per-layer gates (learned softmax / core-space / FlyLoRA) saved with the adapter names.

    ``applied(controller, prompts)`` installs the gates for the call (per-token routing);
    ``route_weights(prompts)`` (after ``bind``) reports each prompt's adapter mass, averaged over its tokens and
    the layers, from one routed forward pass.
    """

    kind = "moe"
    Options = GateOptions

    def __init__(self, adapter_names: Sequence[str], gates: Mapping[str, GateModule], *, layer: str = "gated",
                 config: dict | None = None):
        super().__init__(adapter_names, None, {"kind": "none"})
        self.gates, self.layer, self.config = dict(gates), layer, dict(config or {})
        self.controller: GatedLora | None = None
        self.tokenizer = None

    @classmethod
    def from_controller(cls, controller: GatedLora, config: dict | None = None) -> GateRouter:
        layer = "core" if any(isinstance(x, CoreSpaceLayer) for x in controller.layers.values()) else "gated"
        return cls(controller.adapter_names, controller.gates(), layer=layer, config=config).bind(controller, None)

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: GateOptions) -> GateRouter:
        """Softmax gates in every gated layer, trained with the LM loss on the data's texts."""
        if options.space not in ("gated", "core"):
            raise RecipeError(f"unknown gate space '{options.space}'", fix="use --space gated or --space core")
        model, tokenizer = inputs.base("a MoE gate")
        controller = inputs.controller(model, core=options.space == "core")
        gates = softmax_gates(controller, top_k=options.top_k, temperature=options.temperature)
        texts, _ = inputs.examples(cls.kind)
        train_gates(controller, tokenizer, texts, gates=gates, epochs=options.epochs, lr=options.lr, seed=inputs.seed)
        return cls.from_controller(controller, config={"space": options.space, "trained_on": str(inputs.data)})

    def bind(self, controller: GatedLora, tokenizer) -> GateRouter:
        if list(controller.adapter_names) != self.adapter_names:
            raise RecipeError("the controller's adapters differ from the ones these gates were trained on",
                              fix=f"attach the adapters {', '.join(self.adapter_names)} in this order")
        self.controller, self.tokenizer = controller, tokenizer
        return self

    @contextlib.contextmanager
    def applied(self, controller: GatedLora, prompts: Sequence[str]) -> Iterator[None]:
        with controller.use_gates(self.gates), controller.use_weights(all_routed(controller)):
            yield None

    @torch.no_grad()
    def route_weights(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.controller is None or self.tokenizer is None:
            raise LoramergeError("a MoE gate router reports routing from a forward pass; it is not bound to a model",
                                 fix="call router.bind(controller, tokenizer) (or load_router(dir, model=..., "
                                 "tokenizer=..., controller=...))")
        adapter_gates = {n: g for n, g in self.gates.items() if g.level == "adapter"}
        if not adapter_gates:
            raise LoramergeError("these gates choose rank units, not adapters (FlyLoRA)",
                                 fix="route_weights() reports adapter-level routing; use softmax or core-space gates")
        controller = self.controller
        ensure_pad_token(self.tokenizer)
        batch = tokenize(self.tokenizer, list(prompts), padding=True, padding_side="right", return_tensors="pt")
        device = next(controller.model.parameters()).device
        with self.applied(controller, prompts), recorded_gates(adapter_gates) as store:
            controller.model(**batch.to(device))
        routed = [controller.index(n) for n in self.adapter_names if n not in controller.fixed]
        mass = adapter_mass(store, batch["attention_mask"], routed).cpu()
        out = torch.zeros(len(prompts), self.num_adapters)
        out[:, routed] = mass
        return out

    def _state(self):
        specs = {name: gate.spec() for name, gate in self.gates.items()}
        tensors = {f"{name}::{k}": v for name, gate in self.gates.items() for k, v in gate.state_dict().items()}
        return {"layer": self.layer, "gates": specs, **self.config}, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        gates = {}
        for name, spec in config["gates"].items():
            gate = gate_from_spec(spec)
            prefix = f"{name}::"
            gate.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            gates[name] = gate.eval()
        extra = {k: v for k, v in config.items() if k not in ("layer", "gates", "embedder")}
        return cls(adapter_names, gates, layer=config.get("layer", "gated"), config=extra)


__all__ = [
    "CoreSpaceLayer", "FlyTopKGate", "GateOptions", "GateRouter", "SoftmaxGate", "_gates_in_training", "adapter_mass", "all_routed",
    "attach_core_space", "core_space", "flylora_gates", "gate_from_spec", "gates_in_training", "recorded_gates",
    "softmax_gates", "train_gates",
]
