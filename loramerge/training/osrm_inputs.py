"""OSRM's inputs: the other tasks' texts, and each target module's input features over them.

``read_texts`` / ``task_texts`` read unlabeled texts; ``collect_inputs`` runs them through the base model and
accumulates, per target module, the second moment (or the per-task means) of the module's inputs over the
non-padding tokens. ``loramerge.training.osrm`` turns these statistics into LoRA A directions.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import LoramergeError, RecipeError, UnsupportedAdapterError

# --------------------------------------------------------------------------------------------------------------
# Unlabeled inputs


def read_texts(source: Any, *, text_field: str = "text", max_samples: int | None = None) -> list[str]:
    """Texts from a list of strings, a .txt file (one per non-empty line), a .jsonl file (``text_field`` of each
    record), a directory saved with ``datasets.Dataset.save_to_disk``, or a ``datasets`` (Iterable)Dataset."""
    if isinstance(source, (str, Path)):
        texts = _read_path(Path(source), text_field, max_samples)
    elif hasattr(source, "column_names"):
        texts = _read_dataset(source, text_field, max_samples)
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source[:max_samples] if max_samples is not None else source)
    else:
        raise RecipeError(f"cannot read texts from a {type(source).__name__}",
                          fix="pass a list of strings, a .txt/.jsonl path, or a datasets.Dataset with a text column")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RecipeError("no non-empty texts in the input", path=str(source) if isinstance(source, (str, Path)) else None,
                          fix="give a few hundred unlabeled examples of the other tasks")
    return texts


def _read_path(path: Path, text_field: str, max_samples: int | None) -> list[str]:
    if not path.exists():
        raise RecipeError("input file not found", path=str(path),
                          fix="pass an existing .txt/.jsonl file, a saved dataset directory, or a list of strings "
                              "(a bare string is read as a path)")
    if path.is_dir():
        return _read_dataset(_load_from_disk(path), text_field, max_samples)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, max_samples)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:max_samples]


def _read_jsonl(path: Path, text_field: str, max_samples: int | None) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if max_samples is not None and len(texts) >= max_samples:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"line {number} is not JSON: {exc}", path=str(path),
                                  fix="write one JSON object per line") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise RecipeError(f"line {number} has no string field '{text_field}'", path=str(path),
                                  fix=f"add a '{text_field}' field to every record, or pass text_field=")
            texts.append(record[text_field])
    return texts


def _load_from_disk(path: Path):
    try:
        import datasets
    except ImportError as exc:
        raise RecipeError("reading a saved dataset directory needs the 'datasets' package", path=str(path),
                          fix="pip install 'loramerge[data]' (or pip install datasets)") from exc
    return datasets.load_from_disk(str(path))


def _read_dataset(dataset: Any, text_field: str, max_samples: int | None) -> list[str]:
    columns = dataset.column_names
    if isinstance(columns, dict):
        raise RecipeError(f"got a DatasetDict with splits {sorted(columns)}", fix="pass one split, e.g. ds['train']")
    if columns is not None and text_field not in columns:
        raise RecipeError(f"the dataset has no column '{text_field}' (columns: {columns})",
                          fix="pass text_field= with the name of the text column")
    texts = [row[text_field] for row in islice(iter(dataset), max_samples)]
    if not all(isinstance(t, str) for t in texts):
        raise RecipeError(f"column '{text_field}' does not hold strings", fix="pass the column with the raw text")
    return texts


def task_texts(other_inputs: Any, *, text_field: str = "text", max_samples: int | None = 512) -> dict[str, list[str]]:
    """``{task: texts}`` from a mapping of sources, or from one source (read as a single task named 'other')."""
    if isinstance(other_inputs, Mapping):
        if not other_inputs:
            raise RecipeError("no other tasks given", fix="pass {task_name: texts} for every other task")
        return {str(name): read_texts(src, text_field=text_field, max_samples=max_samples)
                for name, src in other_inputs.items()}
    return {"other": read_texts(other_inputs, text_field=text_field, max_samples=max_samples)}


# --------------------------------------------------------------------------------------------------------------
# Target modules and input statistics


def lora_config(r: int, target_modules: Sequence[str] | str, **kwargs: Any):
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, target_modules=targets, **kwargs)


def resolve_targets(model: torch.nn.Module, target_modules: Sequence[str] | str, r: int = 8) -> dict[str, torch.nn.Module]:
    """The modules PEFT would wrap for ``target_modules`` (its own matcher), keyed by name in the base model."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora_config(r, target_modules)
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if hasattr(module, "get_base_layer"):
            raise RecipeError("the model already has LoRA layers; OSRM's features come from the pre-trained model",
                              module=name, fix="pass the base model before get_peft_model (or a fresh copy of it)")
        if in_features(module) is None:
            raise UnsupportedAdapterError(f"OSRM needs a Linear or Conv1D target, got {type(module).__name__}",
                                          module=name, fix="target only linear projections (q_proj, v_proj, ...)")
        found[name] = module
    if not found:
        raise RecipeError(f"no module of the model matches target_modules={target_modules!r}",
                          fix="use the projection names of this architecture (e.g. q_proj, v_proj for Llama)")
    return found


def in_features(module: torch.nn.Module) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style linear: weight is (d_in x d_out)
        return module.weight.shape[0]
    return None


@dataclass
class Accumulator:
    """Running sums of one module's input features over non-padding tokens (all tasks), plus each task's sum of
    per-sample token means (for the mean_nullspace mode)."""

    d_in: int
    want_gram: bool
    dtype: torch.dtype
    gram: torch.Tensor | None = None
    token_sum: torch.Tensor | None = None
    tokens: int = 0
    sample_mean_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def add(self, x: torch.Tensor, mask: torch.Tensor, task: str) -> None:
        x = x.detach().to(self.dtype)
        m = mask.to(x.device, self.dtype)
        tokens = x[mask.to(x.device).bool()]
        if self.token_sum is None:
            self.token_sum = torch.zeros(self.d_in, dtype=self.dtype, device=x.device)
        self.token_sum += tokens.sum(0)
        self.tokens += tokens.shape[0]
        if self.want_gram:
            if self.gram is None:
                self.gram = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=x.device)
            self.gram += tokens.T @ tokens
        counts = m.sum(1, keepdim=True)
        keep = counts.squeeze(1) > 0
        sample_means = (x * m.unsqueeze(-1)).sum(1)[keep] / counts[keep]
        if task not in self.sample_mean_sums:
            self.sample_mean_sums[task] = torch.zeros(self.d_in, dtype=self.dtype, device=x.device)
            self.samples[task] = 0
        self.sample_mean_sums[task] += sample_means.sum(0)
        self.samples[task] += int(keep.sum())


def _token_view(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The module input as (batch, seq, d_in), aligned with the attention mask."""
    batch, seq = mask.shape
    if x.dim() == 3 and x.shape[:2] == (batch, seq):
        return x
    if x.dim() == 2 and x.shape[0] == batch * seq:
        return x.view(batch, seq, -1)
    raise UnsupportedAdapterError(f"cannot align the module input {tuple(x.shape)} with the tokens {(batch, seq)}",
                                  module=name, fix="OSRM supports decoder-only and encoder-only models")


def _batches(texts: list[str], tokenizer, batch_size: int, max_length: int, device: torch.device) -> Iterator[dict]:
    if tokenizer.pad_token is None:  # no padding possible: one text at a time
        batch_size = 1
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=batch_size > 1,
                            truncation=True, max_length=max_length)
        yield {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def collect_inputs(model: torch.nn.Module, modules: dict[str, torch.nn.Module], tasks: dict[str, list[str]], tokenizer, *,
             want_gram: bool, batch_size: int, max_length: int, dtype: torch.dtype) -> dict[str, Accumulator]:
    """One no-grad pass over every task's texts, hooks summing each target module's inputs."""
    accumulators = {name: Accumulator(in_features(mod), want_gram, dtype) for name, mod in modules.items()}
    state: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise UnsupportedAdapterError("the module was called without a tensor input", module=name,
                                              fix="target plain linear projections")
            accumulators[name].add(_token_view(x, state["mask"], name), state["mask"], state["task"])
        return hook

    device = next(model.parameters()).device
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handles = [mod.register_forward_hook(hook_for(name)) for name, mod in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for task, texts in tasks.items():
                state["task"] = task
                for batch in _batches(texts, tokenizer, batch_size, max_length, device):
                    state["mask"] = batch["attention_mask"]
                    model(**batch, **extra)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, acc in accumulators.items():
        if acc.tokens == 0:
            raise LoramergeError("the module saw no input while running the texts", module=name,
                                 fix="check that the texts are not empty after tokenization")
    return accumulators
