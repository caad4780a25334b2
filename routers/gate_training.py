"""Training per-layer gates with the LM loss (plus an optional routing loss on task labels), all else frozen.

``train_gates`` is a plain torch loop; pass an ``accelerate.Accelerator`` to use one. ``recorded_gates``
captures each gate's output in the current context (thread / task) only, so a concurrent caller's forward
never writes into another's record.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.errors import LoramergeError, RecipeError

from .controller import GatedLora
from .data import label_indices, task_examples
from .layers import GateModule
from .lm_loss import ensure_pad_token, lm_batch, per_sample_lm_loss

_RECORDING: contextvars.ContextVar[tuple[dict, ...]] = contextvars.ContextVar("loramerge_gate_records", default=())


@contextlib.contextmanager
def recorded_gates(gates: Mapping[str, GateModule]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture each gate's latest output (with its autograd graph) while the context is open."""
    store: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            if any(active is store for active in _RECORDING.get()):  # only this context's forward passes
                store[name] = output
        return hook

    handles = [gate.register_forward_hook(hook_for(name)) for name, gate in gates.items()]
    token = _RECORDING.set((*_RECORDING.get(), store))
    try:
        yield store
    finally:
        _RECORDING.reset(token)
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
def gates_in_training(controller: GatedLora, gates: Mapping[str, GateModule]) -> Iterator[list[nn.Parameter]]:
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
        with controller.use_weights(all_routed(controller)):
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
    history: list[float] = []
    with gates_in_training(controller, installed) as params:
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


def all_routed(controller: GatedLora) -> torch.Tensor:
    """Weight 1 on every routed adapter (the gates decide), the fixed weight on fixed ones (a Twin's shared part)."""
    names = [n for n in controller.adapter_names if n not in controller.fixed]
    return controller.routed(torch.ones(1, len(names)), names)


def _texts_and_labels(data: Any) -> tuple[list[str], list[str] | None]:
    if isinstance(data, Sequence) and not isinstance(data, (str, tuple)) and all(isinstance(t, str) for t in data):
        return list(data), None
    return task_examples(data)



_gates_in_training = gates_in_training  # the name benchmarks/quality imports


__all__ = ["adapter_mass", "all_routed", "gates_in_training", "recorded_gates", "train_gates"]
