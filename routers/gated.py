"""The gated concatenated LoRA: the one runtime primitive every router reduces to.

Per target module ``y = W0 x + B_cat (c * (A_cat x))`` where ``A_cat = [A_1; ...; A_N]`` and
``B_cat = [B_1 | ... | B_N]`` hold every adapter's factors (scale folded into B by the loader) and
``c`` is a gate on the rank dimension (methods-lora.md section 0.1). A static merge is a constant
``c``; a per-request router sets ``c`` once per sample; a per-token router computes it per token.

``attach_gated_lora(model, adapters)`` swaps the model's target ``nn.Linear`` (and GPT-2 ``Conv1D``,
``nn.Embedding``) modules for gated layers and returns a ``GatedLora`` controller:

- ``controller.set_weights(w)`` / ``with controller.use_weights(w): model.generate(...)`` sets
  adapter-level weights: ``(N,)`` static, ``(batch, N)`` per sample, ``(batch, seq, N)`` per token, or
  a dict / list of dicts keyed by adapter name. Each weight is expanded over its adapter's rank units.
- ``controller.set_gates({module: gate})`` installs per-layer gate modules (``GateModule``) that compute
  ``c`` from the layer's input and its rank-space projection; their output multiplies the weights.
- ``controller.detach()`` puts the original modules back; ``controller.attach()`` re-inserts the gated ones.

A batch whose samples carry different mixtures runs in one forward pass: the gate is a tensor with
a batch dimension, never a Python loop over adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.errors import IncompatibleAdaptersError, LoramergeError, UnsupportedAdapterError

AdapterLike = Union[str, Path, LoraAdapter]
WeightsLike = Union[torch.Tensor, Sequence[float], Mapping[str, float], Sequence[Mapping[str, float]], None]
GateLevel = Literal["adapter", "rank"]


def load_adapters(adapters: Sequence[AdapterLike], names: Sequence[str] | None = None) -> list[LoraAdapter]:
    """Open adapters (paths or ``LoraAdapter``) lazily; names must be unique."""
    if not adapters:
        raise LoramergeError("no adapters given", fix="pass at least one LoRA adapter directory")
    if names is not None and len(names) != len(adapters):
        raise LoramergeError(f"{len(names)} names for {len(adapters)} adapters", fix="give one name per adapter")
    loaded = []
    for i, adapter in enumerate(adapters):
        name = names[i] if names is not None else None
        if isinstance(adapter, LoraAdapter):
            loaded.append(adapter if name is None or name == adapter.name else _renamed(adapter, name))
        else:
            loaded.append(load_adapter(adapter, name=name))
    seen: set[str] = set()
    for adapter in loaded:
        if adapter.name in seen:
            raise LoramergeError(f"adapter name '{adapter.name}' is used twice", path=str(adapter.source.local_path),
                                 fix="give each adapter a distinct name (names=[...])")
        seen.add(adapter.name)
    return loaded


def _renamed(adapter: LoraAdapter, name: str) -> LoraAdapter:
    from dataclasses import replace

    return replace(adapter, name=name)


class GateModule(nn.Module):
    """A per-layer gate: ``forward(x, z, layer) -> gate``.

    ``x`` is the layer's input (batch, seq, d_in), ``z`` its projection into the layer's rank space
    (batch, seq, R) (the core coordinates for a core-space layer). ``level`` says what the output's last
    dimension indexes: ``"adapter"`` (all N adapters of the controller, by global index) or ``"rank"``
    (the layer's R rank units). The output may be per token (batch, seq, .) or per sample (batch, .).
    """

    level: GateLevel = "adapter"

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer: GatedLayerBase) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class GateState:
    """The adapter-level weights shared by every gated layer of one model (set per call)."""

    def __init__(self, num_adapters: int, default: torch.Tensor):
        self.num_adapters = num_adapters
        self.default = default
        self.weights: torch.Tensor = default
        self.version = 0

    def set(self, weights: torch.Tensor | None) -> None:
        self.weights = self.default if weights is None else weights
        self.version += 1


def align_gate(gate: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Shape a gate (last dim = z's last dim) so it broadcasts against ``z`` (batch, seq, R) or (tokens, R).

    Per-sample gates (batch, R) get a sequence axis; a batch that generate() expanded (beams,
    num_return_sequences) by an integer factor gets each sample's gate repeated in place.
    """
    if gate.dim() == 1:
        return gate
    batch = z.shape[0]
    if gate.shape[0] != batch:
        if batch % gate.shape[0]:
            raise LoramergeError(
                f"the gate has batch size {gate.shape[0]} but the layer input has {batch}",
                fix="set one row of weights per prompt in the batch (or one row for all)",
            )
        gate = gate.repeat_interleave(batch // gate.shape[0], dim=0)
    if gate.dim() == 2 and z.dim() == 3:
        return gate[:, None, :]
    if gate.dim() == 3 and z.dim() == 3 and gate.shape[1] != z.shape[1]:
        raise LoramergeError(
            f"per-token weights cover {gate.shape[1]} tokens but the layer sees {z.shape[1]}",
            fix="per-token weights given from outside apply to one forward call of that length; "
            "for generation use a per-layer gate module (set_gates) or per-sample weights",
        )
    return gate


class GatedLayerBase(nn.Module):
    """A target module wrapped: ``base(x) + delta(x)``, reading the shared gate state."""

    def __init__(self, name: str, base: nn.Module, kind: str, present: Sequence[int], state: GateState):
        super().__init__()
        self.name = name
        self.base = base
        self.kind = kind
        self.state = state
        self.present = tuple(present)
        self.gate: GateModule | None = None
        self.register_buffer("present_index", torch.tensor(self.present, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def request_weights(self) -> torch.Tensor:
        """The current adapter-level weights, restricted to the adapters present in this module."""
        return self.state.weights.index_select(-1, self.present_index.to(self.state.weights.device))


class GatedLoraLayer(GatedLayerBase):
    """``y = W0 x + B_cat (c * (A_cat x))`` for one Linear / Conv1D / Embedding module."""

    def __init__(self, name: str, base: nn.Module, kind: str, factors: Sequence[LoraFactors], present: Sequence[int],
                 state: GateState, dtype: torch.dtype, device: torch.device):
        super().__init__(name, base, kind, present, state)
        self.ranks = tuple(f.rank for f in factors)
        A = torch.cat([f.A for f in factors], dim=0)
        B = torch.cat([f.B for f in factors], dim=1)
        self.register_buffer("lora_A", A.to(device=device, dtype=dtype))
        self.register_buffer("lora_B", B.to(device=device, dtype=dtype))
        units = torch.cat([torch.full((r,), i, dtype=torch.long) for i, r in zip(self.present, self.ranks, strict=True)])
        self.register_buffer("unit_adapter", units.to(device), persistent=False)
        local = torch.cat([torch.full((r,), i, dtype=torch.long) for i, r in enumerate(self.ranks)])
        self.register_buffer("unit_local", local.to(device), persistent=False)
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def total_rank(self) -> int:
        return self.lora_A.shape[0]

    def block(self, local_index: int) -> slice:
        """The rank units of the ``local_index``-th present adapter."""
        start = sum(self.ranks[:local_index])
        return slice(start, start + self.ranks[local_index])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``z = A_cat x`` (rank space); for embeddings, the rows of ``A_cat^T`` picked by the token ids."""
        if self.kind == "embedding":
            return F.embedding(x, self.lora_A.T)
        return F.linear(x.to(self.lora_A.dtype), self.lora_A)

    def unit_gate(self) -> torch.Tensor:
        """The request weights expanded over rank units (cached until the weights change)."""
        version = self.state.version
        if self._cache is None or self._cache[0] != version or self._cache[1].device != self.lora_A.device:
            weights = self.state.weights.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
            self._cache = (version, weights.index_select(-1, self.unit_adapter))
        return self._cache[1]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        gate = align_gate(self.unit_gate(), z)
        if self.gate is not None:
            learned = self.gate(x, z, self)
            if self.gate.level == "adapter":
                learned = learned.index_select(-1, self.unit_adapter)
            gate = gate * align_gate(learned.to(z.dtype), z)
        return F.linear(z * gate, self.lora_B)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _supported_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "linear"
    return None


def _module_dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(d_in, d_out) of a base module as LoRA sees it (vocab, width for embeddings)."""
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # GPT-2 Conv1D stores (d_in, d_out)


LayerFactory = Callable[[str, nn.Module, str, list[LoraFactors], list[int], GateState, torch.dtype, torch.device],
                        GatedLayerBase]


def _gated_factory(name, base, kind, factors, present, state, dtype, device) -> GatedLayerBase:
    return GatedLoraLayer(name, base, kind, factors, present, state, dtype, device)


class GatedLora:
    """Controller of the gated layers attached to one model: weights, gates, detach / attach."""

    def __init__(self, model: nn.Module, adapter_names: list[str], layers: dict[str, GatedLayerBase],
                 originals: dict[str, nn.Module], state: GateState):
        self.model = model
        self.adapter_names = adapter_names
        self.layers = layers
        self._originals = originals
        self.state = state
        self.attached = True
        self.fixed: dict[str, float] = {}
        """Adapters held at a fixed weight whatever a router says (a Twin bundle's shared part)."""

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    @property
    def originals(self) -> dict[str, nn.Module]:
        """The wrapped base modules by name (what ``detach`` puts back)."""
        return dict(self._originals)

    def index(self, name: str) -> int:
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise LoramergeError(f"unknown adapter '{name}'",
                                 fix=f"use one of the attached adapters: {', '.join(self.adapter_names)}") from None

    def as_weights(self, weights: WeightsLike) -> torch.Tensor | None:
        """Normalise weights to a float tensor whose last dimension indexes the N adapters."""
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            return self._row(weights)
        if not isinstance(weights, torch.Tensor):
            if len(weights) and isinstance(weights[0], Mapping):
                return torch.stack([self._row(row) for row in weights])  # type: ignore[arg-type]
            weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() == 0 or weights.shape[-1] != self.num_adapters or weights.dim() > 3:
            raise LoramergeError(
                f"weights of shape {tuple(weights.shape)} do not fit {self.num_adapters} adapters",
                fix="give (N,), (batch, N) or (batch, seq, N) weights, N = number of attached adapters",
            )
        if not torch.isfinite(weights).all():
            raise LoramergeError("weights hold NaN or Inf", fix="check the router's output")
        return weights.float()

    def _row(self, mapping: Mapping[str, float]) -> torch.Tensor:
        row = torch.zeros(self.num_adapters)
        for name, value in mapping.items():
            row[self.index(name)] = float(value)
        return row

    def routed(self, weights: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Router output (batch, M) over ``names`` -> (batch, N) over the attached adapters.

        Adapters the router does not name get their ``fixed`` weight, or 0.
        """
        out = torch.zeros(weights.shape[0], self.num_adapters)
        for name, value in self.fixed.items():
            out[:, self.index(name)] = value
        index = torch.tensor([self.index(n) for n in names], dtype=torch.long)
        out[:, index] = weights.detach().float().cpu()
        return out

    def set_weights(self, weights: WeightsLike) -> None:
        """Weights for the following forward / generate calls (None: the defaults given at attach)."""
        self.state.set(self.as_weights(weights))

    @contextlib.contextmanager
    def use_weights(self, weights: WeightsLike) -> Iterator[None]:
        """``with gated.use_weights(w): model.generate(...)``; restores the previous weights afterwards."""
        previous = self.state.weights
        self.set_weights(weights)
        try:
            yield
        finally:
            self.state.set(previous)

    def set_gates(self, gates: Mapping[str, GateModule] | None) -> None:
        """Install per-layer gate modules by module name (None removes all)."""
        if gates is None:
            for layer in self.layers.values():
                layer.gate = None
            return
        unknown = sorted(set(gates) - set(self.layers))
        if unknown:
            raise LoramergeError(f"no gated layer named '{unknown[0]}'",
                                 fix="key the gates by the module names in controller.layers")
        for name, gate in gates.items():
            layer = self.layers[name]
            gate.to(device=_layer_device(layer))
            layer.gate = gate

    def gates(self) -> dict[str, GateModule]:
        return {name: layer.gate for name, layer in self.layers.items() if layer.gate is not None}

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates().values() for p in gate.parameters()]

    def detach(self) -> nn.Module:
        """Put the original modules back (the model is then exactly the base model)."""
        if self.attached:
            for name, original in self._originals.items():
                parent, attr = _parent_and_attr(self.model, name)
                setattr(parent, attr, original)
            self.attached = False
        return self.model

    def attach(self) -> nn.Module:
        """Re-insert the gated layers after ``detach``."""
        if not self.attached:
            for name, layer in self.layers.items():
                parent, attr = _parent_and_attr(self.model, name)
                setattr(parent, attr, layer)
            self.attached = True
        return self.model

    @contextlib.contextmanager
    def detached(self) -> Iterator[nn.Module]:
        """Run the base model for a while (e.g. to embed prompts with the shared weights only)."""
        was = self.attached
        self.detach()
        try:
            yield self.model
        finally:
            if was:
                self.attach()


def _layer_device(layer: nn.Module) -> torch.device:
    for buf in layer.buffers():
        return buf.device
    return torch.device("cpu")


def attach_gated_lora(
    model: nn.Module,
    adapters: Sequence[AdapterLike],
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
    """
    loaded = load_adapters(adapters, names)
    adapter_names = [a.name for a in loaded]
    default = torch.ones(len(loaded)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if default.shape != (len(loaded),):
        raise LoramergeError(f"{default.numel()} default weights for {len(loaded)} adapters",
                             fix="give one default weight per adapter")
    state = GateState(len(loaded), default)
    factory = layer_factory or _gated_factory
    module_names = sorted({m for a in loaded for m in a.modules})
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
        present = [i for i, a in enumerate(loaded) if name in a.modules]
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
    "AdapterLike", "GateModule", "GateState", "GatedLayerBase", "GatedLora", "GatedLoraLayer",
    "attach_gated_lora", "attach_twin", "load_adapters",
]
