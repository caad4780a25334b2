"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575) on the gated concatenated LoRA.

AdaMerging's coefficients ``lambda_{t,l}`` (per task, per layer) are exactly static gates of the gated
concatenated LoRA ``y = W0 x + B_cat (c * (A_cat x))``: ``c`` is ``lambda_{t,l}`` on task t's rank units
in layer l. Only that (groups x adapters) table is trained, with the LoRAs and the model frozen, by
minimising the entropy of the model's predictions on unlabeled prompts (or, as an option, a supervised
validation loss). The table is initialised at task arithmetic's lambda, kept in ``[low, high]`` by
clamping after each step, and the best table on a held-out slice is kept (early stopping).

``export_static`` then writes ONE plain PEFT adapter through the merge engine (method ``adamerging``),
each lambda folded into its B, so that PEFT's forward with it equals the gated model's forward; the
coefficients are recorded in the adapter's loramerge.json (the recipe's parameters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loramerge.core.progress import progress_bar
from loramerge.data.scoring import EncodedTask, Position, ValidationTask
from loramerge.errors import LoramergeError
from loramerge.merging.methods.adamerging import Granularity, coefficient_group

from .gated import AdapterLike, GatedLayerBase, GatedLora, GateModule, attach_gated_lora

log = logging.getLogger("loramerge.routers.adamerging")
Objective = Literal["entropy", "loss"]


@dataclass
class AdaMergingResult:
    """Learned coefficients (group -> adapter -> lambda) and how the training went."""

    coefficients: dict[str, dict[str, float]]
    granularity: Granularity
    objective: Objective
    history: list[dict[str, float]] = field(default_factory=list)
    initial_heldout: float = math.nan
    best_heldout: float = math.nan
    best_step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients, "granularity": self.granularity, "objective": self.objective,
                "initial_heldout": self.initial_heldout, "best_heldout": self.best_heldout,
                "best_step": self.best_step, "seconds": self.seconds, "history": self.history}

    def parameters(self) -> dict[str, Any]:
        """The ``adamerging`` method's recipe parameters."""
        return {"coefficients": self.coefficients, "granularity": self.granularity}


class CoefficientGate(GateModule):
    """A static per-layer gate: one row of the shared (groups x adapters) coefficient table."""

    level = "adapter"

    def __init__(self, table: nn.Parameter, row: int):
        super().__init__()
        self.table = table
        self.row = row

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer: GatedLayerBase) -> torch.Tensor:
        return self.table[self.row]


def group_rows(layer_names: Sequence[str], granularity: Granularity) -> tuple[list[str], dict[str, int]]:
    """The coefficient groups (sorted) and each gated layer's row in the table."""
    groups = sorted({coefficient_group(n, granularity) for n in layer_names}, key=_natural)
    row = {g: i for i, g in enumerate(groups)}
    return groups, {n: row[coefficient_group(n, granularity)] for n in layer_names}


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def install_coefficients(controller: GatedLora, table: nn.Parameter, granularity: Granularity) -> list[str]:
    """Gate every layer of ``controller`` by its group's row of ``table``; return the group names."""
    groups, rows = group_rows(list(controller.layers), granularity)
    if table.shape != (len(groups), controller.num_adapters):
        raise LoramergeError(f"a coefficient table of shape {tuple(table.shape)} does not fit "
                             f"{len(groups)} groups x {controller.num_adapters} adapters")
    controller.set_weights(torch.ones(controller.num_adapters))
    controller.set_gates({name: CoefficientGate(table, rows[name]) for name in controller.layers})
    return groups


def coefficient_table(coefficients: Mapping[str, Mapping[str, float]], groups: Sequence[str],
                      names: Sequence[str]) -> torch.Tensor:
    """The (groups x adapters) tensor of a coefficient mapping (e.g. to gate a model with learned values)."""
    return torch.tensor([[float(coefficients[g][n]) for n in names] for g in groups], dtype=torch.float64)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _split(n: int, heldout: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    k = max(1, round(n * heldout)) if n > 1 and heldout > 0 else 0
    return sorted(order[k:]), sorted(order[:k])


def _objective(model: nn.Module, tasks: Sequence[EncodedTask], objective: Objective, position, batch_size: int
               ) -> torch.Tensor:
    """Sum over tasks of the per-task mean (the paper sums the tasks' entropies)."""
    terms = [t.entropy(model, position=position, batch_size=batch_size) if objective == "entropy"
             else t.loss(model, batch_size=batch_size) for t in tasks]
    return torch.stack(terms).sum()


def learn_coefficients(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[AdapterLike],
    tasks: Sequence[ValidationTask],
    *,
    names: Sequence[str] | None = None,
    objective: Objective = "entropy",
    position: Position | Literal["auto"] = "auto",
    granularity: Granularity = "layer",
    init: float = 0.3,
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 100,
    lr: float = 0.01,
    batch_size: int = 8,
    heldout: float = 0.25,
    eval_every: int = 10,
    patience: int = 5,
    seed: int = 0,
    max_length: int | None = None,
    show_progress: bool = False,
) -> AdaMergingResult:
    """Train the (groups x adapters) coefficients of the gated LoRA; the model is left as it was.

    ``tasks`` are the unlabeled prompts (labels are read only by ``objective="loss"``). Each step draws
    ``batch_size`` training examples per task; every ``eval_every`` steps the objective on the held-out
    slice decides the best table so far, and ``patience`` evaluations without improvement stop training.
    """
    low, high = bounds
    if not low <= init <= high:
        raise LoramergeError(f"init {init} is outside the bounds [{low}, {high}]",
                             fix="start inside the range the coefficients are clamped to")
    if not tasks or any(len(t) == 0 for t in tasks):
        raise LoramergeError("AdaMerging needs at least one prompt per task", fix="give every task some prompts")
    started = time.perf_counter()
    rng = random.Random(seed)
    encoded = [t.encode(tokenizer, max_length) for t in tasks]
    splits = [_split(len(t), heldout, rng) for t in encoded]
    train = [(t, tr) for t, (tr, _) in zip(encoded, splits)]
    held = [t.select(h) for t, (_, h) in zip(encoded, splits) if h]
    controller = attach_gated_lora(model, adapters, names=names)
    try:
        with _frozen(model), torch.enable_grad():
            result = _train(model, controller, train, held, objective, position, granularity, init, low, high,
                            steps, lr, batch_size, eval_every, patience, rng, show_progress)
    finally:
        controller.set_gates(None)
        controller.detach()
    result.seconds = time.perf_counter() - started
    return result


def _train(model, controller: GatedLora, train, held, objective, position, granularity, init, low, high, steps, lr,
           batch_size, eval_every, patience, rng, show_progress) -> AdaMergingResult:
    groups, _ = group_rows(list(controller.layers), granularity)
    table = nn.Parameter(torch.full((len(groups), controller.num_adapters), float(init), dtype=torch.float64))
    install_coefficients(controller, table, granularity)
    optimizer = torch.optim.Adam([table], lr=lr)

    def heldout_value() -> float:
        if not held:
            return math.nan
        with torch.no_grad():
            return float(_objective(model, held, objective, position, batch_size))

    result = AdaMergingResult(coefficients={}, granularity=granularity, objective=objective)
    result.initial_heldout = result.best_heldout = heldout_value()
    best = table.detach().clone()
    stale = 0
    for step in progress_bar(range(1, steps + 1), description="adamerging", enabled=show_progress):
        batch = [t.select(rng.sample(index, min(batch_size, len(index)))) for t, index in train if index]
        loss = _objective(model, batch, objective, position, batch_size)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            table.clamp_(low, high)
        record = {"step": step, "train": float(loss.detach())}
        if step % eval_every == 0 or step == steps:
            value = heldout_value()
            record["heldout"] = value
            if not held or value < result.best_heldout:
                result.best_heldout, result.best_step, best, stale = value, step, table.detach().clone(), 0
            else:
                stale += 1
        result.history.append(record)
        if stale >= patience:
            log.info("adamerging: early stop at step %d (best held-out at step %d)", step, result.best_step)
            break
    names = controller.adapter_names
    result.coefficients = {g: {n: float(best[i, j]) for j, n in enumerate(names)} for i, g in enumerate(groups)}
    return result


def gate_with(model: nn.Module, adapters: Sequence[AdapterLike], result: AdaMergingResult, *,
              names: Sequence[str] | None = None) -> GatedLora:
    """Attach the gated LoRA gated by learned coefficients (to compare with the exported adapter)."""
    controller = attach_gated_lora(model, adapters, names=names)
    groups, _ = group_rows(list(controller.layers), result.granularity)
    table = nn.Parameter(coefficient_table(result.coefficients, groups, controller.adapter_names),
                         requires_grad=False)
    install_coefficients(controller, table, result.granularity)
    return controller


def adamerging_recipe(adapters: Sequence[str | Path], names: Sequence[str], result: AdaMergingResult,
                      **options: Any) -> dict[str, Any]:
    """The merge recipe of the static adapter: method ``adamerging``, weights 1, exact rank."""
    return {"method": "adamerging", "rank": "exact", "parameters": result.parameters(),
            "adapters": [{"path": str(p), "name": n, "weight": 1.0} for p, n in zip(adapters, names, strict=True)],
            **options}


def export_static(adapters: Sequence[str | Path], names: Sequence[str], result: AdaMergingResult,
                  output: str | Path | None = None, *, force: bool = False, **options: Any):
    """Merge with the learned coefficients folded into B; write one plain PEFT adapter when ``output`` is given."""
    from loramerge.merging.engine import merge

    return merge(adamerging_recipe(adapters, names, result, **options), output, force=force)


def tune_preparer(**options: Any):
    """A ``loramerge.data.tune`` preparer: learn the coefficients once on the validation prompts.

    ``options`` go to ``learn_coefficients`` (objective, steps, lr, ...); they are part of the cache key.
    """

    def prepare(ctx) -> dict[str, Any]:
        result = learn_coefficients(ctx.model, ctx.tokenizer, ctx.adapters, ctx.tasks, names=ctx.names,
                                    seed=ctx.seed, show_progress=ctx.show_progress, **options)
        log.info("adamerging: held-out objective %.4f -> %.4f in %.1fs", result.initial_heldout,
                 result.best_heldout, result.seconds)
        return {"parameters": result.parameters()}

    prepare.key = json.dumps(options, sort_keys=True, default=str)  # type: ignore[attr-defined]
    return prepare


__all__ = ["AdaMergingResult", "CoefficientGate", "adamerging_recipe", "coefficient_table", "export_static",
           "gate_with", "group_rows", "install_coefficients", "learn_coefficients",
           "tune_preparer"]
