"""Per-token mixtures of LoRA experts, all on the gated concatenated LoRA (methods-lora.md sections 7, 8, 9b).

- ``SoftmaxGate`` (X-LoRA style): a learned linear gate per layer on the layer's input, softmax with a
  temperature and optional top-k, over the adapters.
- Core space (CoMoL style, ``attach_core_space``): per module, shared bases ``Q_B`` (QR of ``B_cat``) and
  ``Q_A`` (QR of ``A_cat^T``); each adapter becomes an exact R x R core ``K_t = Q_B^T B_t A_t Q_A``; the gate
  reads ``v = Q_A^T x`` (rank space) and ``dy = Q_B (sum_t g_t K_t) v``. With static weights this is exactly
  ``sum_t w_t B_t A_t x``. A ``SoftmaxGate(source="z")`` is the CoMoL router (N x R parameters).
- ``FlyTopKGate`` (FlyLoRA style): per adapter, only the top-k rank units by ``|A_t x + d|`` are active;
  the balancing bias ``d`` moves only in training mode (frozen at eval, so inference is deterministic).
- ``train_gates``: a plain torch loop that trains the gates with the LM loss (plus an optional routing
  loss on task labels), every other parameter frozen; pass an ``accelerate.Accelerator`` to use one.
- ``GateRouter``: a set of per-layer gates as a router artifact (``save`` / ``load_router``), with
  ``route_weights(prompts)`` = the gates' adapter mass averaged over a prompt's tokens and the layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.core.adapter import LoraFactors
from loramerge.errors import LoramergeError, RecipeError, UnsupportedAdapterError

from .gated import (
    AdapterLike,
    GatedLayerBase,
    GatedLora,
    GatedLoraLayer,
    GateModule,
    GateState,
    align_gate,
    attach_gated_lora,
)
from .request import (
    Router,
    ensure_pad_token,
    label_indices,
    lm_batch,
    per_sample_lm_loss,
    register_router,
    task_examples,
)

# ---------------------------------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Core space (CoMoL style)
# ---------------------------------------------------------------------------------------------------------------------


class CoreSpaceLayer(GatedLayerBase):
    """``y = W0 x + Q_B (sum_t g_t K_t) (Q_A^T x)`` with exact cores ``K_t = Q_B^T B_t A_t Q_A``."""

    def __init__(self, name: str, base: nn.Module, kind: str, factors: Sequence[LoraFactors], present: Sequence[int],
                 state: GateState, dtype: torch.dtype, device: torch.device, trainable_cores: bool = False):
        super().__init__(name, base, kind, present, state)
        if kind != "linear":
            raise UnsupportedAdapterError("core-space routing needs Linear/Conv1D modules", module=name,
                                          fix="leave embedding LoRA out of the core-space router")
        self.ranks = tuple(f.rank for f in factors)
        Q_A, Q_B, cores = core_space(factors)
        self.register_buffer("basis_in", Q_A.T.contiguous().to(device=device, dtype=dtype))  # (R', d_in)
        self.register_buffer("basis_out", Q_B.to(device=device, dtype=dtype))  # (d_out, R')
        cores = cores.to(device=device, dtype=dtype)
        if trainable_cores:
            self.cores = nn.Parameter(cores)
        else:
            self.register_buffer("cores", cores)

    @property
    def core_rank(self) -> int:
        return self.basis_in.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        v = F.linear(x.to(self.basis_in.dtype), self.basis_in)  # (..., R')
        g = align_gate(self.request_weights().to(device=v.device, dtype=v.dtype), v)  # (..., T)
        if self.gate is not None:
            learned = self.gate(x, v, self)
            if self.gate.level != "adapter":
                raise RecipeError("a core-space layer takes adapter-level gates", module=self.name,
                                  fix="use SoftmaxGate(source='z') (CoMoL's router) on core-space layers")
            g = g * align_gate(learned.index_select(-1, self.present_index).to(v.dtype), v)
        per_core = torch.einsum("...j,tij->...ti", v, self.cores)  # (..., T, R')
        mixed = (g[..., None] * per_core).sum(-2)
        return F.linear(mixed, self.basis_out)


def core_space(factors: Sequence[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared bases and exact cores: ``Q_A`` (d_in x R'), ``Q_B`` (d_out x R'), cores (T, R', R').

    ``B_cat = Q_B R_B`` and ``A_cat^T = Q_A R_A`` (thin QR, float64), so ``B_t A_t = Q_B (R_B[:, t] R_A[:, t]^T) Q_A^T``:
    the core of adapter t is built from its own columns of the two R factors, no d_out x d_in matrix.
    """
    B_cat = torch.cat([f.B for f in factors], dim=1).double()
    A_cat = torch.cat([f.A for f in factors], dim=0).double()
    Q_B, R_B = torch.linalg.qr(B_cat, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A_cat.T, mode="reduced")
    cores, start = [], 0
    for f in factors:
        block = slice(start, start + f.rank)
        cores.append(R_B[:, block] @ R_A[:, block].T)
        start += f.rank
    return Q_A.float(), Q_B.float(), torch.stack(cores).float()


def attach_core_space(model: nn.Module, adapters: Sequence[AdapterLike], *, names: Sequence[str] | None = None,
                      weights: Sequence[float] | None = None, dtype: torch.dtype | None = None,
                      trainable_cores: bool = False) -> GatedLora:
    """Attach the adapters as core-space layers (CoMoL style); gates via ``softmax_gates`` or static weights."""
    def factory(name, base, kind, factors, present, state, dtype_, device):
        return CoreSpaceLayer(name, base, kind, factors, present, state, dtype_, device, trainable_cores)

    return attach_gated_lora(model, adapters, names=names, weights=weights, dtype=dtype, layer_factory=factory)


# ---------------------------------------------------------------------------------------------------------------------
# Recording and training
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_gates(gates: Mapping[str, GateModule]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture each gate's latest output (with its autograd graph) while the context is open."""
    store: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            store[name] = output
        return hook

    handles = [gate.register_forward_hook(hook_for(name)) for name, gate in gates.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def adapter_mass(store: Mapping[str, torch.Tensor], mask: torch.Tensor, routed: Sequence[int]) -> torch.Tensor:
    """Adapter-level gate outputs averaged over real tokens, then layers: (batch, len(routed))."""
    total = None
    m = mask.to(torch.float32)[..., None]
    index = torch.tensor(list(routed), dtype=torch.long)
    for out in store.values():
        per_token = out.float().index_select(-1, index.to(out.device))
        if per_token.dim() == 2:  # per-sample gate
            pooled = per_token
        else:
            pooled = (per_token * m).sum(1) / m.sum(1).clamp_min(1.0)
        total = pooled if total is None else total + pooled
    if total is None:
        raise LoramergeError("no gate ran in the forward pass", fix="install the gates (controller.set_gates) first")
    return total / len(store)


@contextlib.contextmanager
def _gates_in_training(controller: GatedLora, gates: Mapping[str, GateModule]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter but the gates', model in eval mode, gates in train mode; restore afterwards."""
    model = controller.model
    params = controller.gate_parameters()
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    for gate in gates.values():
        gate.train()
    try:
        with controller.use_weights(_all_routed(controller)):
            yield params
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for gate in gates.values():
            gate.eval()
        model.train(was_training)


def _gate_loss(controller: GatedLora, gates: Mapping[str, GateModule], batch: tuple[torch.Tensor, ...],
               targets: torch.Tensor | None, routed: list[int], route_loss_weight: float) -> torch.Tensor:
    """LM loss of one batch (+ the routing loss on the token-averaged gate mass when targets are given)."""
    ids, mask, lm_labels = batch
    with recorded_gates(gates) as store:
        logits = controller.model(input_ids=ids, attention_mask=mask).logits
    loss = per_sample_lm_loss(logits, lm_labels).mean()
    if targets is not None:
        mass = adapter_mass(store, mask, routed)
        route = F.nll_loss(torch.log(mass.clamp_min(1e-9)), targets.to(mass.device))
        loss = loss + route_loss_weight * route.to(loss.device)
    return loss


def train_gates(
    controller: GatedLora,
    tokenizer,
    data: Any,
    *,
    gates: Mapping[str, GateModule] | None = None,
    epochs: int = 3,
    lr: float = 1e-2,
    batch_size: int = 16,
    max_length: int = 128,
    route_loss_weight: float = 0.0,
    seed: int = 0,
    accelerator: Any = None,
) -> list[float]:
    """Train the per-layer gates with the LM loss on ``data`` (texts, or labelled examples), all else frozen.

    ``data``: a list of texts, or any form ``task_examples`` reads (labels are then used by the optional
    routing loss ``route_loss_weight * CE(token-averaged gate mass, task)``). ``gates`` are installed
    first when given. Every routed adapter runs at weight 1 (fixed ones at their weight) so the gates
    decide. Returns the loss per step. The model is in eval mode (no dropout); the gates train (so
    FlyLoRA biases move). ``accelerator``: an ``accelerate.Accelerator`` to prepare the optimiser and
    run backward (optional).
    """
    if gates is not None:
        controller.set_gates(gates)
    installed = controller.gates()
    if not installed:
        raise RecipeError("no gates to train", fix="pass gates=softmax_gates(controller) or install them first")
    texts, labels = _texts_and_labels(data)
    routed = [controller.index(n) for n in controller.adapter_names if n not in controller.fixed]
    names = [controller.adapter_names[i] for i in routed]
    targets = label_indices(labels, names) if labels is not None and route_loss_weight > 0 else None
    device = next(controller.model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    history: list[float] = []
    with _gates_in_training(controller, installed) as params:
        optimizer = torch.optim.Adam(params, lr=lr) if params else None
        if accelerator is not None and optimizer is not None:
            optimizer = accelerator.prepare(optimizer)
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=gen).tolist()
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                batch = tuple(t.to(device) for t in lm_batch(tokenizer, [texts[i] for i in idx], max_length))
                loss = _gate_loss(controller, installed, batch, None if targets is None else targets[idx], routed,
                                  route_loss_weight)
                history.append(float(loss.detach()))
                if optimizer is None:  # FlyLoRA gates: the forward passes calibrate the bias
                    continue
                optimizer.zero_grad()
                accelerator.backward(loss) if accelerator is not None else loss.backward()
                optimizer.step()
    return history


def _all_routed(controller: GatedLora) -> torch.Tensor:
    """Weight 1 on every routed adapter (the gates decide), the fixed weight on fixed ones (a Twin's shared part)."""
    names = [n for n in controller.adapter_names if n not in controller.fixed]
    return controller.routed(torch.ones(1, len(names)), names)


def _texts_and_labels(data: Any) -> tuple[list[str], list[str] | None]:
    if isinstance(data, Sequence) and not isinstance(data, (str, tuple)) and all(isinstance(t, str) for t in data):
        return list(data), None
    return task_examples(data)


# ---------------------------------------------------------------------------------------------------------------------
# Gates as a router artifact
# ---------------------------------------------------------------------------------------------------------------------


@register_router
class GateRouter(Router):
    """A set of per-layer gates (learned softmax / core-space / FlyLoRA) saved with the adapter names.

    ``applied(controller, prompts)`` installs the gates for the call (per-token routing);
    ``route_weights(prompts)`` (after ``bind``) reports each prompt's adapter mass, averaged over its tokens and
    the layers, from one routed forward pass.
    """

    kind = "moe"

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

    def bind(self, controller: GatedLora, tokenizer) -> GateRouter:
        if list(controller.adapter_names) != self.adapter_names:
            raise RecipeError("the controller's adapters differ from the ones these gates were trained on",
                              fix=f"attach the adapters {', '.join(self.adapter_names)} in this order")
        self.controller, self.tokenizer = controller, tokenizer
        return self

    @contextlib.contextmanager
    def applied(self, controller: GatedLora, prompts: Sequence[str]) -> Iterator[None]:
        previous = controller.gates()
        controller.set_gates(self.gates)
        try:
            with controller.use_weights(_all_routed(controller)):
                yield None
        finally:
            controller.set_gates(None)
            controller.set_gates(previous)

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
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
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
    "CoreSpaceLayer", "FlyTopKGate", "GateRouter", "SoftmaxGate", "adapter_mass", "attach_core_space", "core_space",
    "flylora_gates", "gate_from_spec", "recorded_gates", "softmax_gates", "train_gates",
]
