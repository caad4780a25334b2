"""Labelled examples for routers: texts and the adapter (task) that should serve each one."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import RecipeError


def read_jsonl(path: str | Path, *, text_field: str = "text", task_field: str = "task") -> tuple[list[str], list[str]]:
    """Read ``{"text": ..., "task": ...}`` lines (blank lines skipped); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("data file not found", path=str(path), fix="give a JSONL file with one {\"text\", \"task\"} per line")
    texts, tasks = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row[text_field]))
            tasks.append(str(row[task_field]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RecipeError(f"line {number} is not a JSON object with '{text_field}' and '{task_field}': {exc}",
                              path=str(path), fix=f'write each line as {{"{text_field}": "...", "{task_field}": "..."}}') from None
    if not texts:
        raise RecipeError("the data file holds no examples", path=str(path), fix="add JSONL lines")
    return texts, tasks


def task_examples(data: Any, *, text_field: str = "text", task_field: str = "task") -> tuple[list[str], list[str]]:
    """Texts and task labels from any of the accepted forms.

    ``(texts, labels)``; ``{task: [texts]}``; a list of ``{"text", "task"}`` dicts; a JSONL path; or a
    ``datasets.Dataset`` with those columns (a ``ClassLabel`` task column gives its names).
    """
    if isinstance(data, (str, Path)):
        return read_jsonl(data, text_field=text_field, task_field=task_field)
    if hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets.Dataset, no import needed
        missing = {text_field, task_field} - set(data.column_names)
        if missing:
            raise RecipeError(f"the dataset has no column '{sorted(missing)[0]}'",
                              fix=f"rename columns to '{text_field}' / '{task_field}' or pass text_field=/task_field=")
        labels = list(data[task_field])
        names = getattr(data.features[task_field], "names", None)
        if names is not None:
            labels = [names[i] for i in labels]
        return [str(t) for t in data[text_field]], [str(x) for x in labels]
    if isinstance(data, Mapping):
        texts = [str(t) for task in data for t in data[task]]
        return texts, [str(task) for task in data for _ in data[task]]
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], Mapping):
        texts, labels = list(map(str, data[0])), list(map(str, data[1]))
        if len(texts) != len(labels):
            raise RecipeError(f"{len(texts)} texts but {len(labels)} labels", fix="give one task label per text")
        return texts, labels
    rows = list(data)
    if rows and all(isinstance(r, Mapping) for r in rows):
        return [str(r[text_field]) for r in rows], [str(r[task_field]) for r in rows]
    raise RecipeError("cannot read training examples from this object",
                      fix="pass (texts, labels), {task: [texts]}, a list of {'text','task'} dicts, a JSONL path or a "
                      "datasets.Dataset")


def label_indices(labels: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
    unknown = sorted(set(labels) - set(adapter_names))
    if unknown:
        raise RecipeError(f"task '{unknown[0]}' in the data is not one of the adapters ({', '.join(adapter_names)})",
                          fix="label each example with the name of the adapter that should serve it")
    lookup = {n: i for i, n in enumerate(adapter_names)}
    return torch.tensor([lookup[x] for x in labels], dtype=torch.long)


__all__ = ["label_indices", "read_jsonl", "task_examples"]
