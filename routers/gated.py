"""The gated concatenated LoRA: the one runtime primitive every router reduces to.

Per target module ``y = W0 x + B_cat (c * (A_cat x))`` where ``A_cat = [A_1; ...; A_N]`` and
``B_cat = [B_1 | ... | B_N]`` hold every adapter's factors (scale folded into B by the loader) and
``c`` is a gate on the rank dimension (docs/ARCHITECTURE.md, "The one runtime primitive"). A static merge is a constant
``c``; a per-request router sets ``c`` once per sample; a per-token router computes it per token.

``attach_gated_lora(model, adapters)`` swaps the model's target ``nn.Linear`` (and GPT-2 ``Conv1D``,
``nn.Embedding``) modules for gated layers and returns a ``GatedLora`` controller:

- ``controller.set_weights(w)`` / ``with controller.use_weights(w): model.generate(...)`` sets
  adapter-level weights: ``(N,)`` static, ``(batch, N)`` per sample, ``(batch, seq, N)`` per token, or
  a dict / list of dicts keyed by adapter name. Each weight is expanded over its adapter's rank units.
- ``controller.set_gates({module: gate})`` installs per-layer gate modules (``GateModule``) that compute
  ``c`` from the layer's input and its rank-space projection; their output multiplies the weights.
- ``controller.detach()`` puts the original modules back; ``controller.attach()`` re-inserts the gated ones.
- Concurrency: ``use_weights`` / ``use_gates`` / ``detached()`` are context-local (per thread, per asyncio
  task); ``set_weights`` / ``set_gates`` / ``detach()`` configure the model for every caller
  (``routers/controller.py``).

Learned static coefficients (AdaMerging, ``loramerge.routers.adamerging``): attach the adapters, freeze the
model, then install one ``GateModule`` per layer whose ``forward`` returns row ``layer`` of a shared
``(layers x tasks)`` ``nn.Parameter`` (an ``(N,)`` tensor); the LoRA factors are buffers, so only the table
trains (``controller.gate_parameters()`` lists it once), and folding ``c[layer, t]`` into ``B_t`` gives the
exact static adapter (tested against a dense reference in ``tests/routers/test_gated.py``).

A batch whose samples carry different mixtures runs in one forward pass: the gate is a tensor with
a batch dimension, never a Python loop over adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from loramerge.core.adapter import LoraAdapter, LoraFactors
from loramerge.core.adapter_set import AdapterSet
from loramerge.errors import IncompatibleAdaptersError, LoramergeError, UnsupportedAdapterError

from .controller import AdapterLike, GatedLora, WeightsLike
from .layers import (
    GatedLayerBase,
    GatedLoraLayer,
    GateLevel,
    GateModule,
    GateState,
    _module_dims,
    _supported_kind,
    align_gate,
)


def load_adapters(adapters: Sequence[AdapterLike], names: Sequence[str] | None = None) -> list[LoraAdapter]:
    """The adapters of ``AdapterSet.open(adapters, names=names)`` as a list (kept for callers of the old API)."""
    return list(AdapterSet.open(adapters, names=names))


LayerFactory = Callable[[str, nn.Module, str, list[LoraFactors], list[int], GateState, torch.dtype, torch.device],
                        GatedLayerBase]


def _gated_factory(name, base, kind, factors, present, state, dtype, device) -> GatedLayerBase:
    return GatedLoraLayer(name, base, kind, factors, present, state, dtype, device)


def attach_gated_lora(
    model: nn.Module,
    adapters: Sequence[AdapterLike] | AdapterSet,
    *,
    names: Sequence[str] | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    layer_factory: LayerFactory | None = None,
) -> GatedLora:
    """Wrap every module targeted by any adapter in a gated layer; return the controller.

    ``weights`` are the defaults used when none are set (ones: the plain sum of the deltas).
    Modules absent from some adapters are gated over the adapters that have them. The factors are
    read module by module, stored in the base module's dtype (or ``dtype``) on its device.
    ``adapters``: paths or ``LoraAdapter`` objects (opened and checked with ``AdapterSet.open``: distinct names,
    one base model, agreeing shapes) or an ``AdapterSet``.
    """
    aset = adapters if isinstance(adapters, AdapterSet) else AdapterSet.open(adapters, names=names)
    loaded = list(aset)
    adapter_names = list(aset.names)
    default = torch.ones(len(loaded)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if default.shape != (len(loaded),):
        raise LoramergeError(f"{default.numel()} default weights for {len(loaded)} adapters",
                             fix="give one default weight per adapter")
    state = GateState(len(loaded), default)
    factory = layer_factory or _gated_factory
    module_names = aset.module_names
    layers: dict[str, GatedLayerBase] = {}
    originals: dict[str, nn.Module] = {}
    for name in module_names:
        base = _find_module(model, name, loaded)
        if isinstance(base, GatedLayerBase):
            raise LoramergeError("the model already has gated layers attached", module=name,
                                 fix="call detach() on the existing controller first")
        kind = _supported_kind(base)
        if kind is None:
            raise UnsupportedAdapterError(
                f"gated LoRA wraps nn.Linear, GPT-2 Conv1D and nn.Embedding, not {type(base).__name__}",
                module=name, fix="route adapters that target Linear/Conv1D/Embedding layers only",
            )
        present = list(aset.present(name))
        factors = [loaded[i].factors(name) for i in present]
        _check_shapes(name, base, kind, factors, [loaded[i] for i in present])
        weight = base.weight
        layer = factory(name, base, kind, factors, present, state, dtype or weight.dtype, weight.device)
        layers[name] = layer
        originals[name] = base
    controller = GatedLora(model, adapter_names, layers, originals, state)
    controller.attached = False
    controller.attach()
    return controller


def _find_module(model: nn.Module, name: str, adapters: list[LoraAdapter]) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        owner = next(a for a in adapters if name in a.modules)
        raise IncompatibleAdaptersError(
            f"the model has no module '{name}' that adapter '{owner.name}' targets", path=str(owner.weights_path),
            module=name, fix="attach to the plain transformers model the adapter was trained on "
            "(not a PeftModel wrapper, not a different architecture)",
        ) from None


def _check_shapes(name: str, base: nn.Module, kind: str, factors: list[LoraFactors], owners: list[LoraAdapter]) -> None:
    d_in, d_out = _module_dims(base, kind)
    for f, owner in zip(factors, owners, strict=True):
        if (f.d_in, f.d_out) != (d_in, d_out) or f.kind != kind:
            raise IncompatibleAdaptersError(
                f"adapter '{owner.name}' has a {f.kind} delta {f.d_out}x{f.d_in} but the model's module is "
                f"{kind} {d_out}x{d_in}", path=str(owner.weights_path), module=name,
                fix="attach adapters trained on this base model",
            )


def attach_twin(model: nn.Module, bundle, *, dtype: torch.dtype | None = None) -> GatedLora:
    """Attach a Twin-Merging bundle (``loramerge.artifacts.twin``) as one gated LoRA: shared + per-task residuals.

    The adapters are named ``shared`` and the task names; ``shared`` is fixed at weight 1 and the
    residuals default to 0, so with no weights set the model is the shared merge, and a router's
    weights w over tasks give ``shared + sum_t w_t residual_t`` (what ``compose_twin`` writes).
    """
    from loramerge.artifacts.twin import TwinBundle, load_twin

    if not isinstance(bundle, TwinBundle):
        bundle = load_twin(bundle)
    tasks = bundle.task_names
    parts = [bundle.shared] + [bundle.residuals[t] for t in tasks]
    controller = attach_gated_lora(model, parts, names=["shared", *tasks], weights=[1.0] + [0.0] * len(tasks),
                                   dtype=dtype)
    controller.fixed = {"shared": 1.0}
    return controller



__all__ = [
    "AdapterLike", "GateLevel", "GateModule", "GateState", "GatedLayerBase", "GatedLora", "GatedLoraLayer",
    "LayerFactory", "WeightsLike", "align_gate", "attach_gated_lora", "attach_twin", "load_adapters",
]
