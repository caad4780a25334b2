"""The gated layers: ``y = W0 x + B_cat (c * (A_cat x))`` per target module, and the gate state they read.

``GateState`` holds the adapter-level weights every gated layer of one model reads. Its values are
controller-wide (``set``) with context-local overrides (``scoped``): an override made in one thread or
asyncio task is invisible to the others, so concurrent callers each run with their own weights, gates
and bypass flag (see ``GatedLora.use_weights``). ``GateModule`` is the per-layer gate interface.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.core.adapter import LoraFactors
from loramerge.errors import LoramergeError

GateLevel = Literal["adapter", "rank"]


class GateModule(nn.Module):
    """A per-layer gate: ``forward(x, z, layer) -> gate``.

    ``x`` is the layer's input (batch, seq, d_in), ``z`` its projection into the layer's rank space
    (batch, seq, R) (the core coordinates for a core-space layer). ``level`` says what the output's last
    dimension indexes: ``"adapter"`` (all N adapters of the controller, by global index) or ``"rank"``
    (the layer's R rank units). The output may be per token (batch, seq, .), per sample (batch, .) or
    static (.,): e.g. a row of a trainable (layers x tasks) coefficient table (AdaMerging).
    """

    level: GateLevel = "adapter"

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer: GatedLayerBase) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class _Scope:
    """Context-local overrides of one ``GateState`` (``None``: not overridden here)."""

    weights: torch.Tensor | None = None
    gates: Mapping[str, GateModule] | None = None
    bypass: bool = False


_SCOPES: contextvars.ContextVar[Mapping[int, _Scope] | None] = contextvars.ContextVar("loramerge_gate_scopes",
                                                                                      default=None)
_NO_SCOPE = _Scope()


class GateState:
    """The adapter-level weights shared by every gated layer of one model.

    ``set`` changes the controller-wide weights (seen by every caller without an override);
    ``scoped(weights=..., gates=..., bypass=...)`` overrides them for the current context only
    (``contextvars``: per thread, per asyncio task), which is what makes concurrent routed calls safe.
    """

    def __init__(self, num_adapters: int, default: torch.Tensor):
        self.num_adapters = num_adapters
        self.default = default
        self._weights: torch.Tensor = default
        self.version = 0

    def set(self, weights: torch.Tensor | None) -> None:
        self._weights = self.default if weights is None else weights
        self.version += 1

    def scope(self) -> _Scope:
        return (_SCOPES.get() or {}).get(id(self), _NO_SCOPE)

    @property
    def weights(self) -> torch.Tensor:
        """The weights the current context runs with (its override, else the controller-wide ones)."""
        local = self.scope().weights
        return self._weights if local is None else local

    @property
    def bypassed(self) -> bool:
        return self.scope().bypass

    def gate_for(self, name: str, installed: GateModule | None) -> GateModule | None:
        """The gate a layer uses: the context's gate set if one is scoped, else the installed one."""
        local = self.scope().gates
        return installed if local is None else local.get(name)

    @contextlib.contextmanager
    def scoped(self, **changes) -> Iterator[None]:
        """Override ``weights`` / ``gates`` / ``bypass`` for the current context until the block ends."""
        scopes = _SCOPES.get() or {}
        token = _SCOPES.set({**scopes, id(self): replace(scopes.get(id(self), _NO_SCOPE), **changes)})
        try:
            yield
        finally:
            _SCOPES.reset(token)


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
        if self.state.bypassed:  # ``controller.detached()`` in this context: exactly the base module
            return out
        return out + self.delta(x).to(out.dtype)

    def active_gate(self) -> GateModule | None:
        """This layer's gate module in the current context (``use_gates`` override, else the installed one)."""
        return self.state.gate_for(self.name, self.gate)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def request_weights(self) -> torch.Tensor:
        """The current adapter-level weights, restricted to the adapters present in this module."""
        weights = self.state.weights
        return weights.index_select(-1, self.present_index.to(weights.device))


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
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

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
        """The current context's weights expanded over rank units.

        Cached per weights tensor (identity) and ``set`` version, so a decode loop expands them once; the
        cache entry is replaced as one tuple, so a concurrent caller with other weights never reads a mix.
        """
        weights, version = self.state.weights, self.state.version
        cache = self._cache
        if cache is not None and cache[0] is weights and cache[1] == version and cache[2].device == self.lora_A.device:
            return cache[2]
        expanded = weights.to(device=self.lora_A.device, dtype=self.lora_A.dtype).index_select(-1, self.unit_adapter)
        if not weights.requires_grad:
            self._cache = (weights, version, expanded)
        return expanded

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        gate = align_gate(self.unit_gate(), z)
        module = self.active_gate()
        if module is not None:
            learned = module(x, z, self)
            if module.level == "adapter":
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

