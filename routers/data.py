"""Labelled examples for routers, read through the one data reader (``loramerge.data.examples``).

Every form that reader takes works here: JSONL lines with a ``task`` and either ``text`` (or
``input``/``output``) or ``prompt`` + ``options`` + ``label`` (a choice example routes on its prompt),
a file per adapter (``{name: file}``), ``.txt``, ``(texts, tasks)``, ``{task: [texts]}``, a list of dicts,
a ``datasets.Dataset``. ``label_indices`` maps task names onto a router's adapter order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loramerge.data.examples import ChoiceExample, read_records, texts_and_tasks
from loramerge.errors import RecipeError


def task_examples(data: Any, *, text_field: str = "text", task_field: str = "task") -> tuple[list[str], list[str]]:
    """``(texts, tasks)`` in the data's order, from any form the data reader takes."""
    return texts_and_tasks(data, text_field=text_field, task_field=task_field)


read_jsonl = task_examples  # the old name for reading a JSONL path (same result)


def lm_examples(data: Any) -> list[str | tuple[str, str]]:
    """Examples of one new task for an LM loss (LoraHub): texts, ``(input, output)`` pairs, or a choice
    example's ``(prompt, answer)``. Any ``task`` field is ignored: every line belongs to the task searched for."""
    records = read_records(data, task="new-task", task_field="\0no task field")
    return [(r.prompt, r.answer) if isinstance(r, ChoiceExample) else r.as_lm() for r in records]


def label_indices(labels: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
    unknown = sorted(set(labels) - set(adapter_names))
    if unknown:
        raise RecipeError(f"task '{unknown[0]}' in the data is not one of the adapters ({', '.join(adapter_names)})",
                          fix="label each example with the name of the adapter that should serve it")
    lookup = {n: i for i, n in enumerate(adapter_names)}
    return torch.tensor([lookup[x] for x in labels], dtype=torch.long)


__all__ = ["label_indices", "lm_examples", "read_jsonl", "task_examples"]
