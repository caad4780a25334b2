"""The shared context of every stage: model, tasks, encoded splits, settings, results and the caches."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import load_adapter

from .cache import EvalCache, deltas_digest
from .model import LM, Encoded
from .tasks import TaskData

Deltas = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """results.json, rewritten after every step so an interrupted run keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, *keys, default=None):
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def put(self, *keys, value) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def adapter_deltas(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    adapter = load_adapter(str(path))
    return {m: (f.B, f.A) for m in adapter.modules for f in [adapter.factors(m)]}


def module_deltas(modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m.name: (m.B, m.A) for m in modules}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@dataclass
class Bench:
    lm: LM
    tasks: list[TaskData]
    enc: dict[str, dict[str, list[Encoded]]]
    settings: object
    results: Results
    evals: EvalCache
    model_path: Path
    cache: Path

    @property
    def names(self) -> list[str]:
        return [d.short for d in self.tasks]

    def correct(self, deltas: Deltas, part: str, only: str | None = None) -> dict[str, list[int]]:
        """Per-example correctness on ``part`` with ``deltas`` added to the base weights (cached by content)."""
        weights = deltas_digest(deltas)
        out: dict[str, list[int]] = {}
        todo = []
        for d in self.tasks:
            if only is not None and d.short != only:
                continue
            hit = self.evals.get(weights, d.digest(part), part)
            if hit is None:
                todo.append(d)
            else:
                out[d.short] = hit
        if todo:
            with self.lm.patched(deltas):
                for d in todo:
                    out[d.short] = self.lm.correct(self.enc[d.short][part])
                    self.evals.put(weights, d.digest(part), part, out[d.short])
        return {d.short: out[d.short] for d in self.tasks if d.short in out}

    def finetuned(self, kind: str = "lora", part: str = "test") -> dict[str, list[int]]:
        """Each task's own adapter's correctness (the denominator of normalized accuracy)."""
        return {t: v[f"{part}_correct"] for t, v in self.results.get("finetuned", kind).items()}


def accuracy(correct: Mapping[str, list]) -> dict[str, float]:
    return {t: sum(v) / len(v) for t, v in correct.items()}


def normalized(correct: Mapping[str, list], finetuned: Mapping[str, list]) -> dict[str, float]:
    """merged / fine-tuned accuracy per task (the papers' normalized accuracy)."""
    acc, ft = accuracy(correct), accuracy(finetuned)
    return {t: a / max(ft[t], 1e-9) for t, a in acc.items()}


def seed_mean(runs: list[Mapping[str, list]]) -> dict[str, list[float]]:
    """Per-example correctness averaged over seeds (fractions; the bootstrap treats them like 0/1)."""
    return {t: [sum(r[t][i] for r in runs) / len(runs) for i in range(len(runs[0][t]))] for t in runs[0]}
