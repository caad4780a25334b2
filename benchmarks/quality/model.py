"""The base model as a scorer of short options and a trainer of all-layer LoRAs.

Scoring: each option's score is the summed log-likelihood of its own tokens after the prompt. The prompt
runs once per example (left-padded batch, KV cache); the options then run on the repeated cache, so an
example costs one prompt pass plus (option tokens - 1) tokens per option, never one pass per option.
Training: next-token cross-entropy on the correct option's tokens after the prompt; the vocabulary
projection is computed only at those positions."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .tasks import Example

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Encoded:
    prompt: torch.Tensor               # [p] token ids (left-truncated to max_length)
    options: tuple[torch.Tensor, ...]  # [t_k] token ids of " option" per option
    answer: int


class LM:
    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.n_layers = len(model.model.layers)
        self._option_ids: dict[str, torch.Tensor] = {}
        # transformers 5 renamed the KV-cache argument and output field (``past_key_values`` -> ``cache``)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"

    # ---- tokens
    def _option(self, text: str) -> torch.Tensor:
        if text not in self._option_ids:
            self._option_ids[text] = torch.tensor(self.tokenizer(" " + text, add_special_tokens=False).input_ids)
        return self._option_ids[text]

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        out = []
        for e in examples:
            ids = self.tokenizer(e.prompt, add_special_tokens=False).input_ids[-self.max_length:]
            out.append(Encoded(torch.tensor(ids), tuple(self._option(o) for o in e.options), e.answer))
        return out

    # ---- scoring
    def _prompt_pass(self, chunk: Sequence[Encoded], use_cache: bool, hidden_layer: int | None = None):
        width = max(len(e.prompt) for e in chunk)
        ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(e.prompt):] = e.prompt
            mask[row, width - len(e.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                               output_hidden_states=hidden_layer is not None)
        return out, mask

    @torch.no_grad()
    def option_scores(self, encoded: Sequence[Encoded], batch_size: int = 32) -> list[torch.Tensor]:
        """[n_options] summed log-likelihood of each option's tokens, per example."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt))
        scores: list[torch.Tensor | None] = [None] * len(encoded)
        head = self.model.lm_head
        for lo in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[lo: lo + batch_size]]
            out, mask = self._prompt_pass(chunk, use_cache=True)
            first = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), -1)
            rows = [(b, opt) for b, e in enumerate(chunk) for opt in e.options]
            row_scores = torch.stack([first[b, opt[0]] for b, opt in rows])
            longest = max(len(opt) for _, opt in rows)
            if longest > 1:  # the options' later tokens, on the prompt's cache repeated once per option
                cache = out.cache if self._cache_arg == "cache" else out.past_key_values
                cache.reorder_cache(torch.tensor([b for b, _ in rows]))
                width = longest - 1
                ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
                opt_mask = torch.zeros_like(ids)
                for r, (_, opt) in enumerate(rows):
                    ids[r, : len(opt) - 1] = opt[:-1]
                    opt_mask[r, : len(opt) - 1] = 1
                prompt_mask = mask[[b for b, _ in rows]]
                positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(width)[None, :]
                hidden = self.model.model(input_ids=ids, attention_mask=torch.cat([prompt_mask, opt_mask], -1),
                                          position_ids=positions, use_cache=True,
                                          **{self._cache_arg: cache}).last_hidden_state
                where = opt_mask.bool()
                logp = torch.log_softmax(head(hidden[where]).float(), -1)
                targets = torch.cat([opt[1:] for _, opt in rows if len(opt) > 1])
                picked = logp[torch.arange(len(targets)), targets]
                row_of = torch.nonzero(where)[:, 0]
                row_scores = row_scores.index_add(0, row_of, picked)
            at = 0
            for b, e in enumerate(chunk):
                scores[order[lo + b]] = row_scores[at: at + len(e.options)].clone()
                at += len(e.options)
        return scores  # type: ignore[return-value]

    def correct(self, encoded: Sequence[Encoded]) -> list[int]:
        """1 where the highest-scoring option is the answer, per example."""
        return [int(int(s.argmax()) == e.answer) for s, e in zip(self.option_scores(encoded), encoded)]

    def accuracy(self, encoded: Sequence[Encoded]) -> float:
        right = self.correct(encoded)
        return sum(right) / len(right)

    @torch.no_grad()
    def pooled(self, encoded: Sequence[Encoded], layer: int, batch_size: int = 32) -> torch.Tensor:
        """[n, d] the base model's hidden state after ``layer`` layers, averaged over each prompt's tokens."""
        rows = []
        for lo in range(0, len(encoded), batch_size):
            out, mask = self._prompt_pass(encoded[lo: lo + batch_size], use_cache=False, hidden_layer=layer)
            hidden = out.hidden_states[layer]
            rows.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(rows)

    # ---- training loss
    def answer_batch(self, batch: Sequence[Encoded]):
        """Right-padded prompt + correct option, its mask, and the (row, position) pairs that predict the
        option's tokens with their targets."""
        seqs = [torch.cat([e.prompt, e.options[e.answer]]) for e in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        rows, cols, targets = [], [], []
        for r, (e, s) in enumerate(zip(batch, seqs)):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
            for j, tok in enumerate(e.options[e.answer]):
                rows.append(r)
                cols.append(len(e.prompt) + j - 1)
                targets.append(int(tok))
        return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)

    def answer_loss(self, batch: Sequence[Encoded]) -> torch.Tensor:
        ids, mask, rows, cols, targets = self.answer_batch(batch)
        hidden = self.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return nn.functional.cross_entropy(self.model.lm_head(hidden[rows, cols]).float(), targets)

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


def lora_config(rank: int, alpha: float, layers: Sequence[int] = ()):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="CAUSAL_LM", layers_to_transform=list(layers) or None)


def target_regex(layers: Sequence[int] = ()) -> str | list[str]:
    """PEFT's target_modules for the seven projections of ``layers`` (all layers when empty)."""
    if not layers:
        return list(TARGETS)
    return rf".*\.layers\.({'|'.join(map(str, layers))})\.(self_attn|mlp)\.({'|'.join(TARGETS)})"


def train_lora(lm: LM, examples: Sequence[Encoded], out_dir: Path, *, rank: int, alpha: float, steps: int,
               batch_size: int, lr: float, seed: int, base_path: str, peft_wrap=None,
               layers: Sequence[int] = ()) -> dict:
    """Train one PEFT LoRA on every layer's seven projections (CE on the answer's tokens); save to ``out_dir``.

    ``peft_wrap(model) -> peft_model`` overrides the plain ``get_peft_model`` (OSRM / LoRI initialisations)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = lora_config(rank, alpha, layers)
    peft_model = peft_wrap(lm.model) if peft_wrap is not None else get_peft_model(lm.model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    generator = torch.Generator().manual_seed(seed)
    started, losses = time.perf_counter(), []
    lm.model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
            loss = lm.answer_loss([examples[i] for i in idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - started
        peft_model.peft_config["default"].base_model_name_or_path = base_path
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        peft_model.save_pretrained(str(tmp))
        tmp.rename(out_dir)
    finally:
        lm.model.eval()
        peft_model.unload()
    k = max(1, min(10, steps // 2))
    return {"steps": steps, "batch_size": batch_size, "seconds": seconds, "s_per_step": seconds / steps,
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
