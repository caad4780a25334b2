"""Scoring a causal LM on validation data: option log-likelihood, LM loss, prediction entropy.

Texts are tokenized once (``encode_*``) and scored many times (one model per merge candidate). Every
function runs under the caller's grad mode, so the same code scores a merge (``torch.no_grad``) and
trains AdaMerging's coefficients (gradients flow to the gates).

- Multiple choice ``{"prompt", "options", "label"}``: each option's summed log-likelihood given the
  prompt (prompt ids + option ids, the option tokenized on its own as lm-eval does); the prediction is the
  best option. Score: accuracy.
- Text ``{"text"}``: mean token LM loss; score ``exp(-loss)`` (the per-token probability), so that
  higher is better and the ratio to the task's own adapter is a normalized score in (0, ~1].
- Prompts: the entropy of the next-token distribution at the last prompt token (the answer position),
  or averaged over every position of the text.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.core.adapter import LoraFactors
from loramerge.data.examples import ChoiceExample, Example, TextExample

log = logging.getLogger("loramerge.data.scoring")
Position = Literal["last", "all"]


@dataclass(frozen=True)
class Encoded:
    """Token ids of (context, continuation) pairs: the loss counts the continuation tokens only."""

    ids: tuple[tuple[int, ...], ...]
    n_context: tuple[int, ...]
    owner: tuple[int, ...]
    """Which example each sequence belongs to (several per multiple-choice example)."""
    option: tuple[int, ...]
    n_examples: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, examples: Sequence[int]) -> Encoded:
        """The sequences of some examples (renumbered 0..len(examples)-1 in the order given)."""
        where = {e: k for k, e in enumerate(examples)}
        keep = [i for i in range(len(self.ids)) if self.owner[i] in where]
        return Encoded(tuple(self.ids[i] for i in keep), tuple(self.n_context[i] for i in keep),
                       tuple(where[self.owner[i]] for i in keep), tuple(self.option[i] for i in keep),
                       len(examples), self.pad_id)


def _max_length(tokenizer, max_length: int | None) -> int:
    if max_length:
        return max_length
    limit = getattr(tokenizer, "model_max_length", None) or 2048
    return int(min(limit, 2048))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _fit(context: list[int], continuation: list[int], limit: int, truncated: list[int]) -> tuple[list[int], int]:
    """Cut the context from the left so that context + continuation fits the model (and count it)."""
    keep = limit - len(continuation)
    if keep < 1:
        truncated[0] += 1
        continuation = continuation[: limit - 1]
        keep = 1
    if len(context) > keep:
        truncated[0] += 1
        context = context[len(context) - keep:]
    return context + continuation, len(context)


def _warn_truncated(count: int, limit: int, what: str) -> None:
    if count:
        log.warning("%d %s longer than %d tokens were truncated from the left", count, what, limit)


def encode_choices(tokenizer, prompts: Sequence[str], options: Sequence[Sequence[str]],
                   max_length: int | None = None) -> Encoded:
    """One sequence per (example, option): prompt ids followed by the option's own ids."""
    limit, truncated = _max_length(tokenizer, max_length), [0]
    ids, n_ctx, owner, option = [], [], [], []
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        context = list(tokenizer(prompt)["input_ids"])
        for k, text in enumerate(opts):
            cont = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not cont:
                raise ValueError(f"option {k} of example {i} has no tokens")
            seq, n = _fit(context, cont, limit, truncated)
            ids.append(tuple(seq))
            n_ctx.append(n)
            owner.append(i)
            option.append(k)
    _warn_truncated(truncated[0], limit, "prompt+option sequences")
    return Encoded(tuple(ids), tuple(n_ctx), tuple(owner), tuple(option), len(prompts), _pad_id(tokenizer))


def encode_texts(tokenizer, texts: Sequence[str], max_length: int | None = None) -> Encoded:
    """One sequence per text; every token after the first is predicted."""
    limit, truncated = _max_length(tokenizer, max_length), [0]
    ids = []
    for text in texts:
        seq = list(tokenizer(text)["input_ids"])
        if len(seq) > limit:
            truncated[0] += 1
            seq = seq[:limit]
        ids.append(tuple(seq))
    _warn_truncated(truncated[0], limit, "texts")
    n = len(ids)
    return Encoded(tuple(ids), (1,) * n, tuple(range(n)), (0,) * n, n, _pad_id(tokenizer))


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> Encoded:
    """Prompts alone (for the entropy objective): the context is the whole sequence."""
    enc = encode_texts(tokenizer, prompts, max_length)
    return Encoded(enc.ids, tuple(len(s) for s in enc.ids), enc.owner, enc.option, enc.n_examples, enc.pad_id)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(enc: Encoded, batch_size: int,
             device: torch.device) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Right-padded batches (sequences of similar length together), with their indices into ``enc``."""
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = max(len(enc.ids[i]) for i in index)
        ids = torch.full((len(index), width), enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            seq = enc.ids[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield index, ids.to(device), mask.to(device)


def sequence_logprobs(model: nn.Module, enc: Encoded, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of each sequence's continuation, and its number of tokens."""
    totals: list[torch.Tensor | None] = [None] * len(enc)
    tokens = torch.zeros(len(enc))
    for index, ids, mask in _batches(enc, batch_size, _device(model)):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        picked = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        pos = torch.arange(target.shape[1], device=ids.device)[None, :]
        n_ctx = torch.tensor([enc.n_context[i] for i in index], device=ids.device)[:, None]
        keep = (pos + 1 >= n_ctx) & (mask[:, 1:] == 1)
        sums = (picked * keep).sum(-1)
        for row, i in enumerate(index):
            totals[i] = sums[row]
            tokens[i] = float(keep[row].sum())
    return torch.stack(totals), tokens  # type: ignore[arg-type]


def choice_logits(model: nn.Module, enc: Encoded, *, batch_size: int = 16) -> torch.Tensor:
    """(examples, max options) option log-likelihoods; -inf where an example has fewer options."""
    sums, _ = sequence_logprobs(model, enc, batch_size=batch_size)
    n_opt = max(enc.option) + 1
    out = torch.full((enc.n_examples, n_opt), float("-inf"), device=sums.device, dtype=sums.dtype)
    owner = torch.tensor(enc.owner, device=sums.device)
    option = torch.tensor(enc.option, device=sums.device)
    return out.index_put((owner, option), sums)


def choice_accuracy(model: nn.Module, enc: Encoded, labels: Sequence[int], *, batch_size: int = 16) -> float:
    logits = choice_logits(model, enc, batch_size=batch_size)
    return float((logits.argmax(-1).cpu() == torch.tensor(list(labels))).float().mean())


def choice_loss(model: nn.Module, enc: Encoded, labels: Sequence[int], *, batch_size: int = 16) -> torch.Tensor:
    """Cross-entropy of the label over the options' log-likelihoods (the supervised objective)."""
    logits = choice_logits(model, enc, batch_size=batch_size)
    return F.cross_entropy(logits, torch.tensor(list(labels), device=logits.device))


def text_loss(model: nn.Module, enc: Encoded, *, batch_size: int = 16) -> torch.Tensor:
    """Mean token LM loss over the texts (padding excluded)."""
    sums, tokens = sequence_logprobs(model, enc, batch_size=batch_size)
    return -sums.sum() / tokens.sum().clamp(min=1).to(sums.device)


def prediction_entropy(model: nn.Module, enc: Encoded, *, position: Position = "last",
                       batch_size: int = 16) -> torch.Tensor:
    """Mean entropy of the next-token distribution at the last token of each prompt, or over all tokens."""
    total, count = None, 0
    for _, ids, mask in _batches(enc, batch_size, _device(model)):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if position == "last":
            last = mask.sum(-1) - 1
            logits = logits[torch.arange(ids.shape[0], device=ids.device), last]
            weights = torch.ones(ids.shape[0], device=ids.device)
        else:
            weights = mask.float()
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        part = (entropy * weights).sum()
        total = part if total is None else total + part
        count += int(weights.sum())
    assert total is not None, "no prompts to score"
    return total / max(count, 1)


@dataclass(frozen=True)
class ValidationTask:
    """One task's examples in memory: multiple choice (prompts, options, labels) or plain texts."""

    name: str
    kind: Literal["choice", "text"]
    inputs: tuple[str, ...]
    """The prompts (choice) or the texts (text)."""
    options: tuple[tuple[str, ...], ...] = ()
    labels: tuple[int, ...] = ()
    contexts: tuple[str, ...] = ()
    """Text tasks only: an unscored prompt before each text ({"input", "output"} lines), or empty."""

    @classmethod
    def from_examples(cls, name: str, examples: Sequence[Example]) -> ValidationTask:
        """From the shared reader's records (``loramerge.data.examples``) of one task."""
        if examples and all(isinstance(e, ChoiceExample) for e in examples):
            return cls(name, "choice", tuple(e.prompt for e in examples), tuple(e.options for e in examples),
                       tuple(e.label for e in examples))
        texts = [e for e in examples if isinstance(e, TextExample)]
        contexts = tuple(e.prompt for e in texts) if any(e.prompt for e in texts) else ()
        return cls(name, "text", tuple(e.text for e in texts), contexts=contexts)

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index: Sequence[int]) -> ValidationTask:
        pick = list(index)
        if self.kind == "text":
            return ValidationTask(self.name, "text", tuple(self.inputs[i] for i in pick),
                                  contexts=tuple(self.contexts[i] for i in pick) if self.contexts else ())
        return ValidationTask(self.name, "choice", tuple(self.inputs[i] for i in pick),
                              tuple(self.options[i] for i in pick), tuple(self.labels[i] for i in pick))

    def encode(self, tokenizer, max_length: int | None = None) -> EncodedTask:
        if self.kind == "text" and self.contexts:
            scored = encode_choices(tokenizer, self.contexts, [(t,) for t in self.inputs], max_length)
            full = encode_texts(tokenizer, [c + t for c, t in zip(self.contexts, self.inputs)], max_length)
            return EncodedTask(self, scored, full)
        if self.kind == "text":
            scored = encode_texts(tokenizer, self.inputs, max_length)
            return EncodedTask(self, scored, scored)
        return EncodedTask(self, encode_choices(tokenizer, self.inputs, self.options, max_length),
                           encode_prompts(tokenizer, self.inputs, max_length))


@dataclass(frozen=True)
class EncodedTask:
    """A task tokenized once: what is scored, and the prompts whose predictions AdaMerging's entropy reads."""

    task: ValidationTask
    scored: Encoded
    prompts: Encoded

    def __len__(self) -> int:
        return len(self.task)

    def select(self, index: Sequence[int]) -> EncodedTask:
        return EncodedTask(self.task.take(index), self.scored.select(index), self.prompts.select(index))

    def score(self, model: nn.Module, *, batch_size: int = 16) -> float:
        """Accuracy (choice) or ``exp(-loss)`` (text); higher is better."""
        if self.task.kind == "choice":
            return choice_accuracy(model, self.scored, self.task.labels, batch_size=batch_size)
        return score_of_loss(float(text_loss(model, self.scored, batch_size=batch_size)))

    def loss(self, model: nn.Module, *, batch_size: int = 16) -> torch.Tensor:
        """The supervised objective: option cross-entropy (choice) or LM loss (text)."""
        if self.task.kind == "choice":
            return choice_loss(model, self.scored, self.task.labels, batch_size=batch_size)
        return text_loss(model, self.scored, batch_size=batch_size)

    def entropy(self, model: nn.Module, *, position: Position | Literal["auto"] = "auto",
                batch_size: int = 16) -> torch.Tensor:
        """Prediction entropy; ``auto``: at the answer position for prompts, over every token for texts."""
        if position == "auto":
            position = "last" if self.task.kind == "choice" else "all"
        return prediction_entropy(model, self.prompts, position=position, batch_size=batch_size)


def score_of_loss(loss: float) -> float:
    """A text task's score: the per-token probability ``exp(-loss)`` (higher is better)."""
    return math.exp(-loss)


def _weight_delta(module: nn.Module, factors: LoraFactors) -> torch.Tensor:
    """``B @ A`` laid out like the module's weight (Linear: out x in; Conv1D, Embedding: transposed)."""
    delta = factors.B.float() @ factors.A.float()
    if factors.kind == "embedding" or type(module).__name__ == "Conv1D":
        return delta.T
    return delta


@contextlib.contextmanager
def patched(model: nn.Module, factors: Mapping[str, LoraFactors]) -> Iterator[nn.Module]:
    """Temporarily add each module's ``B @ A`` to the base weight (``W0 + dW``), restored on exit.

    Equal to PEFT's forward with the adapter loaded, up to rounding, and much cheaper than reloading
    a PeftModel for every candidate a tuner scores.
    """
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, f in factors.items():
                module = model.get_submodule(name)
                weight = module.weight
                saved[name] = weight.detach().clone()
                weight.add_(_weight_delta(module, f).to(device=weight.device, dtype=weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)
