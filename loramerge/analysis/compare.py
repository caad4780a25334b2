"""Run several merge methods on the same adapters and compare them: rank, size, error, time, task loss."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from loramerge.core.adapter_set import AdapterSet
from loramerge.errors import OutputError, RecipeError
from loramerge.merging.engine import run_merge
from loramerge.merging.recipe import parse_recipe


@dataclass
class CompareRow:
    label: str
    total_rank: int = 0
    kib: float = 0.0
    max_rel_error: float = 0.0
    seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    output: Path | None = None
    reference: bool = False
    """A baseline row (base model, single adapters), not a merge."""

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses.values()) / len(self.losses) if self.losses else None


def run_label(method: str, options: dict[str, Any]) -> str:
    extra = []
    if options.get("factorwise"):
        extra.append("factorwise/PEFT")
    if "rank" in options:
        extra.append(f"rank {options['rank']}")
    if options.get("parameters"):
        extra.extend(f"{k}={v}" for k, v in options["parameters"].items())
    return method + (f" ({', '.join(extra)})" if extra else "")


def _dirname(label: str) -> str:
    return re.sub(r"_+", "_", "".join(c if c.isalnum() or c in "-=." else "_" for c in label)).strip("_")


def lm_loss(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean token-level LM loss over ``texts`` (padding ignored)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(**batch, labels=labels).loss) * n
        count += n
    return total / max(count, 1)


class LossEvaluator:
    """Per-task LM loss of the base model with an adapter loaded by PEFT (the way users load it)."""

    def __init__(self, base_model_path: str | Path, texts: dict[str, list[str]]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(base_model_path).eval()
        self.texts = texts

    def __call__(self, adapter_dir: Path | None) -> dict[str, float]:
        from peft import PeftModel

        if adapter_dir is None:
            return {task: lm_loss(self.base, self.tokenizer, t) for task, t in self.texts.items()}
        model = PeftModel.from_pretrained(self.base, adapter_dir).eval()
        try:
            return {task: lm_loss(model, self.tokenizer, t) for task, t in self.texts.items()}
        finally:
            self.base = model.unload()


def load_task_texts(path: str | Path) -> dict[str, list[str]]:
    """Texts per task for the LM-loss evaluation, through the one data reader (loramerge.data.examples).

    ``{"task", "text"}`` lines give their text; multiple-choice lines give the prompt followed by the right option
    (what the task's adapter should continue with).
    """
    from loramerge.data.examples import read_records

    out: dict[str, list[str]] = {}
    for example in read_records(path):
        text = example.full_text if example.kind == "text" else example.prompt + example.answer
        out.setdefault(example.task, []).append(text)
    return out


def compare_methods(
    adapters: list[str | Path],
    runs: list[tuple[str, dict[str, Any]]],
    workdir: str | Path,
    *,
    evaluator: LossEvaluator | None = None,
    weights: list[float] | None = None,
    force: bool = False,
) -> list[CompareRow]:
    """Merge ``adapters`` once per (method, options) run into ``workdir`` and measure each result.

    The adapters are opened and checked once (one AdapterSet) and every run goes through the one engine.
    Files already in ``workdir`` (an earlier comparison's adapters, its plot) are replaced only with ``force``;
    that is checked for every run before the first merge.
    """
    if weights is not None and len(weights) != len(adapters):
        raise RecipeError(f"{len(weights)} weights for {len(adapters)} adapters", fix="give one weight per adapter")
    outs = [Path(workdir) / _dirname(run_label(method, options)) for method, options in runs]
    taken = [p for p in [*outs, Path(workdir) / "comparison.png"] if p.exists()]
    if taken and not force:
        raise OutputError(f"the work directory already holds {', '.join(p.name for p in taken)}", path=str(workdir),
                          fix="choose a new --output directory, or pass --force (force=True) to replace them")
    opened = AdapterSet.open(list(adapters))
    entries = [{"path": str(a.source.local_path), "name": a.name, "weight": 1.0 if weights is None else weights[i]}
               for i, a in enumerate(opened)]
    rows = []
    for (method, options), out in zip(runs, outs):
        label = run_label(method, options)
        started = time.perf_counter()
        recipe = parse_recipe({"method": method, "adapters": entries, **options}, source=f"compare run '{label}'")
        result = run_merge(recipe, adapters=opened, show_progress=False)
        result.save(out, force=force)
        row = CompareRow(label=label, total_rank=result.total_rank, max_rel_error=result.max_rel_error,
                         seconds=time.perf_counter() - started, output=out,
                         kib=(out / "adapter_model.safetensors").stat().st_size / 1024)
        if evaluator is not None:
            row.losses = evaluator(out)
        rows.append(row)
    return rows


def render_table(rows: list[CompareRow], title: str) -> Table:
    tasks = list(next((r.losses for r in rows if r.losses), {}))
    table = Table(title=title)
    columns = ["method", "total rank", "KiB", "max rel. err", "merge s", *tasks] + (["mean"] if tasks else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        merged = not r.reference
        cells = [r.label, str(r.total_rank) if r.total_rank else "-", f"{r.kib:.0f}" if merged else "-",
                 f"{r.max_rel_error:.1e}" if merged else "-", f"{r.seconds:.2f}" if merged else "-"]
        cells += [f"{r.losses[t]:.3f}" if t in r.losses else "-" for t in tasks]
        if tasks:
            cells.append(f"{r.mean_loss:.3f}" if r.mean_loss is not None else "-")
        table.add_row(*cells)
    return table


def plot_rows(rows: list[CompareRow], path: Path, title: str) -> Path | None:
    """A horizontal bar chart of the mean task loss (or of the error when there is no data)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with_loss = all(r.mean_loss is not None for r in rows)
    values = [r.mean_loss if with_loss else r.max_rel_error for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh([r.label for r in rows], values, color=["#999" if r.reference else "#3a7" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("mean held-out LM loss (lower is better)" if with_loss else "max relative reconstruction error")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
