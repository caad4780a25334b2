"""The base model split in two: the frozen bottom layers run once per example (cached hidden states), the
top ``n_top`` layers (the only ones with LoRA) run per configuration. Scoring reads the answer letter's
log-likelihood at the last prompt position; training is next-token cross-entropy on that letter."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .tasks import LETTERS, Example

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _view(decoder: nn.Module, layers: Sequence[nn.Module], norm: nn.Module) -> nn.Module:
    """A LlamaModel sharing ``decoder``'s modules but running only ``layers`` (then ``norm``)."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view._modules["layers"] = nn.ModuleList(list(layers))
    view._modules["norm"] = norm
    view.config = copy.deepcopy(decoder.config)
    view.config.num_hidden_layers = len(layers)
    return view


def _pad(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad [len, d] tensors to a batch; returns (batch, mask, last index)."""
    lengths = torch.tensor([s.shape[0] for s in states])
    batch = torch.zeros(len(states), int(lengths.max()), states[0].shape[1], dtype=states[0].dtype)
    for i, s in enumerate(states):
        batch[i, : s.shape[0]] = s
    mask = (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).long()
    return batch, mask, lengths - 1


class SplitLM:
    def __init__(self, model: nn.Module, tokenizer, n_top: int, max_length: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"  # keep the options and 'Answer:' when a prompt is long
        self.max_length = max_length
        layers = list(model.model.layers)
        self.n_layers = len(layers)
        self.start = self.n_layers - n_top
        self.top_layers = list(range(self.start, self.n_layers))
        self.bottom = _view(model.model, layers[: self.start], nn.Identity())
        self.top = _view(model.model, layers[self.start:], model.model.norm)
        self.letter_ids = torch.tensor([tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in LETTERS])

    # ---- the bottom, once per example
    @torch.no_grad()
    def bottom_states(self, examples: Sequence[Example], batch_size: int = 16) -> list[torch.Tensor]:
        ids = [torch.tensor(self.tokenizer(e.prompt, truncation=True, max_length=self.max_length).input_ids)
               for e in examples]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[torch.Tensor | None] = [None] * len(ids)
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            width = max(len(ids[i]) for i in chunk)
            batch = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
            mask = torch.zeros_like(batch)
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            hidden = self.bottom(input_ids=batch, attention_mask=mask, use_cache=False).last_hidden_state
            for row, i in enumerate(chunk):
                out[i] = hidden[row, : len(ids[i])].clone()
        return out  # type: ignore[return-value]

    # ---- the top, per configuration
    def last_hidden(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, mask, last = _pad(states)
        hidden = self.top(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[torch.arange(len(states)), last]

    @torch.no_grad()
    def letter_logits(self, states: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """[n, len(LETTERS)] answer-letter logits (the log-likelihood up to a per-example constant)."""
        order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
        rows = torch.empty(len(states), len(LETTERS))
        weight = self.model.lm_head.weight[self.letter_ids]
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            rows[chunk] = self.last_hidden([states[i] for i in chunk]) @ weight.T
        return rows

    def predictions(self, states: Sequence[torch.Tensor], examples: Sequence[Example]) -> torch.Tensor:
        logits = self.letter_logits(states)
        return torch.tensor([int(logits[i, : e.n_options].argmax()) for i, e in enumerate(examples)])

    def accuracy(self, states: Sequence[torch.Tensor], examples: Sequence[Example]) -> float:
        preds = self.predictions(states, examples)
        return float((preds == torch.tensor([e.answer for e in examples])).float().mean())

    # ---- adapters as weight deltas
    @contextmanager
    def patched(self, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Add ``B @ A`` to each named Linear's weight for the duration (restored exactly afterwards)."""
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, (B, A) in deltas.items():
                    layer = self.model.get_submodule(name)
                    saved[name] = layer.weight.detach().clone()
                    layer.weight += (B.float() @ A.float()).to(layer.weight.dtype)
            yield
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    self.model.get_submodule(name).weight.copy_(weight)


def train_lora(split: SplitLM, states: Sequence[torch.Tensor], examples: Sequence[Example], out_dir: Path, *,
               rank: int, alpha: float, steps: int, batch_size: int, lr: float, seed: int,
               base_path: str, peft_wrap=None) -> dict:
    """Train one PEFT LoRA on the top layers (next-token CE on the answer letter); save it to ``out_dir``.

    ``peft_wrap(model) -> peft_model`` overrides the plain ``get_peft_model`` (OSRM / LoRI initialisations)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                        layers_to_transform=split.top_layers, bias="none", task_type="CAUSAL_LM")
    peft_model = peft_wrap(split.model) if peft_wrap is not None else get_peft_model(split.model, config)
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    targets = split.letter_ids[torch.tensor([e.answer for e in examples])]
    generator = torch.Generator().manual_seed(seed)
    started, losses = time.perf_counter(), []
    split.model.train()
    for _ in range(steps):
        idx = torch.randint(len(states), (batch_size,), generator=generator)
        hidden = split.last_hidden([states[i] for i in idx])
        loss = nn.functional.cross_entropy(split.model.lm_head(hidden), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    split.model.eval()
    seconds = time.perf_counter() - started
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    peft_model.save_pretrained(str(out_dir))
    peft_model.unload()
    return {"steps": steps, "seconds": seconds, "s_per_step": seconds / steps,
            "loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10}
