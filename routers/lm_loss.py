"""Tokenised LM batches and per-sample LM loss (LoraHub's search, gate training, ``route eval``'s task scores)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

TOKENIZER_LOCK = threading.RLock()
"""Held around every tokenizer call of the routers: a fast tokenizer sets its padding on the shared Rust object
before each batch, so two threads tokenizing at once could pad with each other's side (or fail with
"Already borrowed"). Tokenizing is cheap next to a forward pass; the forward runs outside the lock."""


def tokenize(tokenizer, texts, **kwargs):
    """``tokenizer(texts, **kwargs)`` under ``TOKENIZER_LOCK`` (pass ``padding_side`` rather than setting it)."""
    with TOKENIZER_LOCK:
        return tokenizer(texts, **kwargs)


def decode(tokenizer, ids, **kwargs) -> list[str]:
    """``tokenizer.batch_decode(ids, **kwargs)`` under ``TOKENIZER_LOCK``."""
    with TOKENIZER_LOCK:
        return tokenizer.batch_decode(ids, **kwargs)


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def lm_batch(tokenizer, examples: Sequence[Any], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels (-100 outside the target) for ``(input, output)`` pairs or texts."""
    ensure_pad_token(tokenizer)
    rows, targets = [], []
    for ex in examples:
        if isinstance(ex, Mapping):
            ex = (ex.get("input", ""), ex["output"])
        if isinstance(ex, str):
            ids = tokenize(tokenizer, ex)["input_ids"]
            rows.append(ids[:max_length])
            targets.append(1)
            continue
        prompt, output = ex
        head = tokenize(tokenizer, prompt)["input_ids"]
        tail = tokenize(tokenizer, output, add_special_tokens=False)["input_ids"]
        ids = (head + tail)[-max_length:]
        rows.append(ids)
        targets.append(max(len(ids) - len(tail), 1))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, start) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, start:len(row)] = ids[i, start:len(row)]
    return ids, mask, labels


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's labelled tokens: (batch,)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1).clamp_min(1)
    return loss.sum(1) / counts


__all__ = ["TOKENIZER_LOCK", "decode", "ensure_pad_token", "lm_batch", "per_sample_lm_loss", "tokenize"]
