"""RegMean++ (arXiv 2508.03121): RegMean whose layer-l statistics come from the partially merged model.

For block l = 1..L: each task's texts run through the blocks < l *already merged*, then through block l with the
task's own adapter; the inputs each linear module of block l sees give ``G_t``; RegMean merges block l (the same
closed form, exact factored) and the merged block replaces it before block l + 1. Cost: two passes of one block
per task and layer (hidden states between blocks are kept for every text, ``tokens x d`` floats per task), not a
forward per layer.

Blocks are replayed with the keyword arguments (attention mask, rotary embeddings) captured at the first block,
so this supports decoders whose blocks share one mask (Llama, Mistral without sliding windows, Qwen2, SmolLM2).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loramerge.core.adapter import LoraAdapter
from loramerge.core.progress import progress_bar
from loramerge.data.accumulate import GramAccumulator, adapted
from loramerge.data.calibration import _batches, context_length, tokenize
from loramerge.errors import DataError
from loramerge.merging.methods.base import Factored, ModuleInputs
from loramerge.merging.methods.lines import layer_index

log = logging.getLogger("loramerge.data.regmean_plus")


class _Stop(Exception):
    pass


@dataclass
class _GramView:
    """The ``MergeStatistics`` interface ``regmean`` reads, over in-memory Grams of one block."""

    grams: dict[str, dict[str, torch.Tensor]]  # task -> input key -> G
    inputs: dict[str, str]
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.grams)

    def input_key(self, module: str) -> str:
        return self.inputs[module]

    def gram(self, name: str, module: str) -> torch.Tensor:
        return self.grams[name][self.inputs[module]]

    def memo(self, key: Any, compute) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


def _blocks(model: nn.Module, modules: Sequence[str]) -> tuple[nn.ModuleList, str]:
    """The decoder's block list and its name prefix (``model.layers``)."""
    first = modules[0]
    index = layer_index(first)
    if index is None:
        raise DataError("regmean_plus merges modules inside the decoder blocks only", module=first,
                        fix="use regmean for adapters that also target the embeddings or the LM head")
    prefix = first[: first.index(f".{index}.")]
    blocks = model.get_submodule(prefix)
    if not isinstance(blocks, nn.ModuleList):
        raise DataError(f"'{prefix}' is not a list of blocks", module=first, fix="use regmean for this model")
    outside = [m for m in modules if not m.startswith(prefix + ".")]
    if outside:
        raise DataError("regmean_plus merges modules inside the decoder blocks only", module=outside[0],
                        fix="use regmean for adapters that also target the embeddings or the LM head")
    return blocks, prefix


def _first_states(model: nn.Module, block: nn.Module, batches) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(hidden states entering the first block, its keyword arguments, mask) per batch: the embeddings only."""
    captured: list[tuple[torch.Tensor, dict, torch.Tensor]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}, mask))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids, mask in batches:
            with contextlib.suppress(_Stop), torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def regmean_plus_merge(model: nn.Module, tokenizer: Any, adapters: Sequence[LoraAdapter], weights: Sequence[float],
                       texts: dict[str, list[str]], regmean_fn, cfg: Any, *, max_length: int | None = None,
                       batch_size: int = 8, show_progress: bool = True) -> dict[str, Factored]:
    """Merge block by block with statistics from the partially merged model; returns the merged factors."""
    modules = sorted({m for a in adapters for m, i in a.modules.items() if i.kind == "linear"})
    if len(modules) != len({m for a in adapters for m in a.modules}):
        raise DataError("regmean_plus merges linear modules only (an adapter targets embeddings)",
                        fix="use regmean, which merges the linear modules and refuses the others per module")
    blocks, _ = _blocks(model, modules)
    length = context_length(model, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    states = {}
    for a in adapters:
        tokens = tokenize(tokenizer, texts[a.name], length)
        if tokens.truncated:
            log.warning("%d texts of '%s' were truncated to %d tokens", tokens.truncated, a.name, length)
        states[a.name] = _first_states(model, blocks[0], _batches(tokens, batch_size, pad_id))
    factors = {a.name: {m: a.factors(m) for m in a.modules} for a in adapters}
    merged: dict[str, Factored] = {}
    by_block: dict[int, list[str]] = {}
    for m in modules:
        by_block.setdefault(layer_index(m), []).append(m)  # type: ignore[arg-type]
    for index in progress_bar(range(len(blocks)), description="regmean++ (block by block)", enabled=show_progress):
        block, names = blocks[index], by_block.get(index, [])
        grams, inputs = {}, {}
        for a in adapters:  # this block's inputs: merged blocks below, the task's own adapter in this block
            acc = GramAccumulator(modules=names, fisher=False)
            own = {m: (f.A, f.B) for m, f in factors[a.name].items() if m in names}
            with adapted(model, own), _hooks_pre(model, acc):
                for hidden, kwargs, mask in states[a.name]:
                    acc.new_batch(mask)
                    _run_block(block, hidden, kwargs)
            grams[a.name] = {k: v / max(acc.tokens, 1) for k, v in acc.grams.items()}
            inputs = acc.inputs
        view = _GramView(grams, inputs)
        deltas = {}
        for m in names:
            present = [a for a in adapters if m in factors[a.name]]
            inp = ModuleInputs(name=m, factors=tuple(factors[a.name][m] for a in present),
                               weights=tuple(w for a, w in zip(adapters, weights) if m in factors[a.name]),
                               adapter_names=tuple(a.name for a in present), context=view)
            merged[m] = regmean_fn(cfg, inp)
            deltas[m] = (merged[m].A, merged[m].B)
        with adapted(model, deltas):  # the merged block carries every task's states to the next block
            for a in adapters:
                states[a.name] = [(_run_block(block, h, kw), kw, mask) for h, kw, mask in states[a.name]]
    return merged


@contextlib.contextmanager
def _hooks_pre(model: nn.Module, acc: GramAccumulator):
    handles = [model.get_submodule(n).register_forward_pre_hook(acc.pre_hook(n)) for n in acc.modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["regmean_plus_merge"]
