"""Calibration statistics: run a model over each adapter's unlabeled texts and record, per targeted module,
what the data-informed methods need (docs/ARCHITECTURE.md, README "Merging with a little data"):

- ``G = X^T X / n``: the second moment of the module's inputs (tokens as rows, padding excluded). Modules that
  read the same tensor (q/k/v read the attention input, gate/up the MLP input) share one Gram, computed once and
  stored once under the first module's name (``inputs`` in the manifest maps every module to its key);
- token counts, and with ``fisher=True`` the output factor of a Kronecker-factored diagonal Fisher,
  ``E[g^2]`` over the module's outputs (``g = dL/dy`` per token for the LM loss on next tokens sampled from the
  model's own predictions, the paper's Fisher; ``fisher_labels="text"``: the text's own tokens, the empirical
  Fisher); the input factor ``E[x^2]`` is the Gram's diagonal. ``F ~ E[g^2] E[x^2]^T`` assumes
  gradients and inputs independent across a token's coordinates: an approximation, said in the manifest.

Statistics come from each adapter's own fine-tuned model (``source="adapter"``: ``W0 + B A`` for the pass, the papers'
choice) or from the base model (``source="base"``). Hooks accumulate each batch's
``X^T X`` (float32 matmul, upper triangle) into float32 partial sums added into float64 totals every few batches
(loramerge.data.accumulate); activations are never kept beyond the batch. Texts longer than the
context (or ``max_length``) are truncated, counted in the manifest and reported with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loramerge.core.adapter import LoraAdapter, load_adapter
from loramerge.core.names import parse_pair
from loramerge.core.progress import progress_bar
from loramerge.data.accumulate import GramAccumulator, adapted
from loramerge.data.examples import fingerprint, read_examples
from loramerge.errors import BaseModelError, DataError, NumericalError
from loramerge.version import __version__

log = logging.getLogger("loramerge.data.calibration")

Source = Literal["adapter", "base"]
MANIFEST = "calibration.json"
FORMAT = "loramerge-calibration/1"
FisherLabels = Literal["sampled", "text"]
FISHER_NOTE = {
    "sampled": "Kronecker-factored diagonal Fisher: F[i, j] ~ E[g_i^2] * E[x_j^2], g = dLoss/dy per token for the "
               "LM loss on next tokens sampled from the model's own predictions (the Fisher of Matena & Raffel; "
               "seeded), E[x^2] the Gram's diagonal",
    "text": "Kronecker-factored empirical diagonal Fisher: F[i, j] ~ E[g_i^2] * E[x_j^2], g = dLoss/dy per token "
            "for the LM loss on the text's own next tokens, E[x^2] the Gram's diagonal",
}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_base_model(reference: str | Path) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local directory (or a ``.gguf`` file), in float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(reference)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        kwargs["gguf_file"], path = path.name, path.parent
    if not path.exists():
        raise BaseModelError("base model not found", path=str(reference),
                             fix="give a local transformers model directory (with its tokenizer) or a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load the base model: {exc}", path=str(reference),
                             fix="give a local transformers model directory that holds a tokenizer too") from exc
    return model, tokenizer


def model_fingerprint(model: nn.Module, modules: Sequence[str]) -> str:
    """sha256 of the config and of the targeted weights' sums and first rows (cheap; tells base models apart)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in modules:
        w = model.get_submodule(name).weight.detach()
        digest.update(name.encode())
        wd = w.double()
        digest.update(repr((float(wd.sum()), float(wd.square().sum()))).encode())
        digest.update(w.reshape(-1)[:256].float().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.bos_token, tokenizer.eos_token]).encode()).hexdigest()


def context_length(model: nn.Module, max_length: int | None) -> int:
    context = getattr(model.config, "max_position_embeddings", None) or max_length or 2048
    return min(max_length, context) if max_length else context


# ---------------------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hooks(model: nn.Module, acc: GramAccumulator) -> Iterator:
    handles = []
    try:
        for name in acc.modules:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(acc.pre_hook(name)))
            if acc.fisher:
                handles.append(module.register_forward_hook(acc.out_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Raised after the last module with statistics ran: the rest of the forward is not needed."""


def _stop_after(model: nn.Module, acc: GramAccumulator):
    """A hook ending the forward after the last module that records (None when a module runs twice per pass)."""
    if not acc.order or len(set(acc.order)) != len(acc.order):
        return None

    def stop(module, args, output):
        raise _Stop

    return model.get_submodule(acc.order[-1]).register_forward_hook(stop)


# ---------------------------------------------------------------------------------------------------------------------
# One pass
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedTexts:
    ids: list[list[int]]
    truncated: int
    max_length: int


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenizedTexts:
    """Token ids per text, cut to ``max_length`` (the count of cut texts is reported)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    truncated = sum(len(row) > max_length for row in ids)
    return TokenizedTexts([row[:max_length] for row in ids], truncated, max_length)


def _batches(tokens: TokenizedTexts, batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = sorted(range(len(tokens.ids)), key=lambda i: len(tokens.ids[i]))  # similar lengths pad less
    out = []
    for lo in range(0, len(order), batch_size):
        rows = [tokens.ids[i] for i in order[lo:lo + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        out.append((ids, mask))
    return out


def _runner(model: nn.Module, modules: Sequence[str], fisher: bool) -> nn.Module:
    """The decoder alone when no targeted module is outside it and no loss is needed (skips the LM head)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if fisher or decoder is None:
        return model
    prefix = next((n for n, m in model.named_modules() if m is decoder), None)
    if not prefix or not all(m.startswith(prefix + ".") for m in modules):
        return model
    return decoder


def collect(model: nn.Module, tokens: TokenizedTexts, modules: Sequence[str], *, fisher: bool = False,
            deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, batch_size: int = 8,
            pad_id: int = 0, description: str = "calibrating", show_progress: bool = True,
            fisher_labels: FisherLabels = "sampled", seed: int = 0) -> GramAccumulator:
    """Run the texts through ``model`` (with ``deltas`` added) and accumulate the statistics of ``modules``.

    Without Fisher: the decoder alone (no LM head), in inference mode, each forward ended after the last module
    that records (measured in the first batch)."""
    generator = torch.Generator().manual_seed(seed)
    acc = GramAccumulator(modules=list(modules), fisher=fisher)
    runner = _runner(model, modules, fisher)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    stop = None
    try:
        with adapted(model, deltas or {}), _hooks(model, acc):  # the adapter first: the Fisher hook sees it
            for ids, mask in progress_bar(_batches(tokens, batch_size, pad_id), description=description,
                                          enabled=show_progress):
                acc.new_batch(mask)
                if not fisher:
                    with torch.inference_mode(), contextlib.suppress(_Stop):
                        runner(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, use_cache=False)
                    if acc.recording:
                        acc.recording = False
                        stop = _stop_after(model, acc)
                    continue
                acc.recording = False
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
                targets = ids[:, 1:]
                if fisher_labels == "sampled":  # the model's own predictive distribution, not the text
                    probs = logits[:, :-1].detach().float().softmax(-1).reshape(-1, logits.shape[-1])
                    targets = torch.multinomial(probs, 1, generator=generator).reshape(targets.shape)
                targets = targets.masked_fill(mask[:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1), ignore_index=-100, reduction="sum")
                loss.backward()
    finally:
        if stop is not None:
            stop.remove()
        for p in params:
            p.requires_grad_(True)
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# calibrate: every adapter, saved with a manifest
# ---------------------------------------------------------------------------------------------------------------------


def _as_adapters(adapters: Sequence[LoraAdapter | str | Path] | Mapping[str, str | Path]) -> list[LoraAdapter]:
    if isinstance(adapters, Mapping):
        return [load_adapter(p, name=n) for n, p in adapters.items()]
    out = []
    for a in adapters:
        if isinstance(a, LoraAdapter):
            out.append(a)
            continue
        if Path(str(a)).exists():  # a path that exists wins over a NAME=PATH reading of it
            out.append(load_adapter(a))
            continue
        name, path = parse_pair(str(a), option="adapter", name_optional=True)
        out.append(load_adapter(path, name=name))
    return out


def _linear_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    return sorted({m for a in adapters for m, info in a.modules.items() if info.kind == "linear"})


def calibrate(
    base_model: str | Path | tuple[nn.Module, Any],
    adapters: Sequence[LoraAdapter | str | Path] | Mapping[str, str | Path],
    data: Any,
    output: str | Path,
    *,
    source: Source = "adapter",
    max_length: int | None = None,
    batch_size: int = 8,
    fisher: bool = False,
    fisher_labels: FisherLabels = "sampled",
    limit: int | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Compute the statistics of every adapter on its own texts and write them to ``output`` (atomically).

    ``data``: anything ``read_examples`` reads, with one task per adapter name (a choice example contributes
    its prompt). ``base_model``: a local model directory / .gguf file, or an already loaded ``(model, tokenizer)``.
    """
    from loramerge.io.writer import atomic_directory, check_output_path

    if fisher_labels not in FISHER_NOTE:
        raise DataError(f"unknown Fisher labels '{fisher_labels}'", fix="use 'sampled' (the paper) or 'text'")
    if source not in ("adapter", "base"):
        raise DataError(f"unknown statistics source '{source}'", fix="use 'adapter' (the default) or 'base'")
    out = check_output_path(Path(output), force=force)
    loaded = _as_adapters(adapters)
    names = [a.name for a in loaded]
    if len(set(names)) != len(names):
        raise DataError(f"adapter names repeat: {names}", fix="give each adapter a distinct name (name=path)")
    examples = read_examples(data, tasks=names, limit=limit)
    model, tokenizer = load_base_model(base_model) if isinstance(base_model, (str, Path)) else base_model
    modules = _linear_modules(loaded)
    missing = [m for m in modules if not _has_module(model, m)]
    if missing:
        raise DataError(f"the base model has no module '{missing[0]}' that the adapters target",
                        path=str(base_model) if isinstance(base_model, (str, Path)) else None,
                        fix="calibrate with the base model the adapters were trained on")
    length = context_length(model, max_length)
    started = time.perf_counter()
    records, inputs = [], {}
    with atomic_directory(out, force=force) as tmp:  # a failure leaves nothing at the output path
        for i, adapter in enumerate(loaded):
            record, inputs = _calibrate_one(model, tokenizer, adapter, examples[adapter.name], modules, tmp,
                                            f"stats-{i:03d}.safetensors", source=source, length=length,
                                            fisher=fisher, batch_size=batch_size, show_progress=show_progress,
                                            fisher_labels=fisher_labels)
            records.append(record)
        manifest = {
            "format": FORMAT, "loramerge_version": __version__,
            "base_model": {"reference": str(base_model) if isinstance(base_model, (str, Path)) else None,
                           "name_or_path": getattr(model.config, "_name_or_path", None),
                           "fingerprint": model_fingerprint(model, modules)},
            "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", None),
                          "fingerprint": tokenizer_fingerprint(tokenizer)},
            "max_length": length, "source": source, "fisher": FISHER_NOTE[fisher_labels] if fisher else None,
            "batch_size": batch_size, "data_sha256": fingerprint(examples), "adapters": records, "inputs": inputs,
            "truncated": sum(r["truncated"] for r in records), "seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _calibrate_one(model: nn.Module, tokenizer: Any, adapter: LoraAdapter, examples: Sequence[Any],
                   modules: Sequence[str], directory: Path, file: str, *, source: Source, length: int, fisher: bool,
                   batch_size: int, show_progress: bool, fisher_labels: FisherLabels = "sampled"
                   ) -> tuple[dict, dict[str, str]]:
    """One adapter's pass; its tensors go straight to ``directory / file`` (one adapter in memory at a time)."""
    from safetensors.torch import save_file

    texts = [e.full_text for e in examples]
    tokens = tokenize(tokenizer, texts, length)
    if tokens.truncated:
        log.warning("%d of %d texts of '%s' are longer than %d tokens and were truncated (counted in the manifest)",
                    tokens.truncated, len(texts), adapter.name, length)
    deltas = {}
    if source == "adapter":
        for m, info in adapter.modules.items():
            if info.kind == "linear":
                f = adapter.factors(m)
                deltas[m] = (f.A, f.B)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    acc = collect(model, tokens, modules, fisher=fisher, deltas=deltas, batch_size=batch_size, pad_id=pad_id,
                  description=f"calibrating {adapter.name}", show_progress=show_progress, fisher_labels=fisher_labels)
    if acc.tokens == 0:
        raise DataError(f"the texts of '{adapter.name}' hold no tokens", fix="give non-empty texts")
    tensors = {f"gram:{k}": v for k, v in acc.means().items()}
    tensors |= {f"fisher_out:{k}": (v / acc.tokens).float() for k, v in acc.out_sq.items()}
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t.sum(dtype=torch.float64))), None)
    if bad is not None:
        raise NumericalError(f"the statistics of adapter '{adapter.name}' hold NaN or Inf", module=bad.split(":")[1],
                             fix="the model produced NaN/Inf activations on these texts: check the adapter and the "
                                 "base model's dtype; nothing was written")
    save_file(tensors, str(directory / file), metadata={"format": FORMAT})
    record = {
        "name": adapter.name, "path": str(adapter.source.local_path), "sha256": adapter.sha256,
        "base_model": adapter.base_model, "data_sha256": fingerprint(examples), "texts": len(texts),
        "tokens": acc.tokens, "truncated": tokens.truncated, "file": file,
    }
    return record, dict(acc.inputs)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        return getattr(model.get_submodule(name), "weight", None) is not None
    except AttributeError:
        return False


__all__ = ["FISHER_NOTE", "MANIFEST", "calibrate", "collect", "context_length", "load_base_model",
           "model_fingerprint", "tokenize", "tokenizer_fingerprint"]
