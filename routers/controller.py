"""``GatedLora``: the controller of the gated layers attached to one model (weights, gates, detach / attach).

Thread and asyncio safety: ``use_weights``, ``use_gates`` and ``detached`` are context-local
(``contextvars``), so concurrent callers of one model (threads, asyncio tasks) each run with their own
mixture; run the forward / ``generate`` inside the ``with`` block, in the same thread or task.
``set_weights``, ``set_gates``, ``detach`` / ``attach`` change the model for every caller: use them to
configure it, not per request. Training the gates (``train_gates``) is not meant to run beside inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Union

import torch
from torch import nn

from loramerge.core.adapter_set import AdapterLike
from loramerge.errors import LoramergeError

from .layers import GatedLayerBase, GateModule, GateState, _parent_and_attr

WeightsLike = Union[torch.Tensor, Sequence[float], Mapping[str, float], Sequence[Mapping[str, float]], None]


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
        """Controller-wide weights for the following calls (None: the defaults given at attach).

        Every caller without a ``use_weights`` block of its own sees them; for per-request weights
        under concurrency use ``use_weights``.
        """
        self.state.set(self.as_weights(weights))

    @contextlib.contextmanager
    def use_weights(self, weights: WeightsLike) -> Iterator[None]:
        """``with gated.use_weights(w): model.generate(...)``: weights for this context only (thread / task).

        Concurrent callers each see their own; the previous weights come back when the block ends.
        """
        tensor = self.as_weights(weights)
        with self.state.scoped(weights=self.state.default if tensor is None else tensor.clone()):
            yield

    def current_weights(self) -> torch.Tensor:
        """The weights a forward in this context would run with."""
        return self.state.weights

    def _checked_gates(self, gates: Mapping[str, GateModule]) -> dict[str, GateModule]:
        unknown = sorted(set(gates) - set(self.layers))
        if unknown:
            raise LoramergeError(f"no gated layer named '{unknown[0]}'",
                                 fix="key the gates by the module names in controller.layers")
        for name, gate in gates.items():
            gate.to(device=_layer_device(self.layers[name]))
        return dict(gates)

    def set_gates(self, gates: Mapping[str, GateModule] | None) -> None:
        """Install per-layer gate modules by module name, for every caller (None removes all)."""
        if gates is None:
            for layer in self.layers.values():
                layer.gate = None
            return
        for name, gate in self._checked_gates(gates).items():
            self.layers[name].gate = gate

    @contextlib.contextmanager
    def use_gates(self, gates: Mapping[str, GateModule] | None) -> Iterator[None]:
        """Run with exactly these gate modules (layers not named run ungated), for this context only."""
        with self.state.scoped(gates=self._checked_gates(gates or {})):
            yield

    def gates(self) -> dict[str, GateModule]:
        """The gate modules a forward in this context uses (a ``use_gates`` block's, else the installed ones)."""
        active = {name: layer.active_gate() for name, layer in self.layers.items()}
        return {name: gate for name, gate in active.items() if gate is not None}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' parameters, each once (gates may share parameters)."""
        seen: dict[int, nn.Parameter] = {}
        for gate in self.gates().values():
            for p in gate.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

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
        """Run the base model for a while (e.g. to embed prompts with the shared weights only).

        Context-local: the gated layers return exactly their base module's output for this thread / task
        while other callers keep their routing (``detach()`` removes the layers for everyone).
        """
        with self.state.scoped(bypass=True):
            yield self.model


def _layer_device(layer: nn.Module) -> torch.device:
    for buf in layer.buffers():
        return buf.device
    return torch.device("cpu")


__all__ = ["AdapterLike", "GatedLora", "WeightsLike"]  # AdapterLike is core.adapter_set's, re-exported here
