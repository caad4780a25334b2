"""The routed half of `loramerge demo`: a centroid router picks each prompt's adapter mix per request."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from loramerge.demo.run import TASKS, task_sequences

from .embedders import PooledHiddenEmbedder
from .gated import attach_gated_lora
from .generate import generate_routed
from .similarity import CentroidRouter


def run_routed_demo(base_dir: Path, adapters: dict[str, Path], console: Console) -> float:
    """Fit a centroid router on task-labelled texts, route held-out prompts, generate for them in one batch.

    Returns the routing accuracy on the held-out prompts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    gated = attach_gated_lora(model, list(adapters.values()), names=list(adapters))
    embedder = PooledHiddenEmbedder(model, tok, controller=gated)  # base-model hidden states (gates off)
    train = {task: [" ".join(s.split()[:4]) for s in task_sequences(task, 24, seed=7)] for task in TASKS}
    router = CentroidRouter.fit(train, embedder)
    held_out = [(task, " ".join(s.split()[:3])) for task in TASKS for s in task_sequences(task, 8, seed=123)]
    predicted = router.predict([p for _, p in held_out])
    accuracy = sum(p == t for (t, _), p in zip(held_out, predicted)) / len(held_out)

    prompts = ["two three four", "blue small big", "fish cat dog", "print loop list"]
    with torch.no_grad():
        result = generate_routed(gated, tok, prompts, router, max_new_tokens=6, do_sample=False)
    table = Table(title=f"routed requests (centroid router over base-model embeddings; held-out routing accuracy "
                        f"{accuracy:.0%})")
    for col in ("prompt", "routed to", "continuation"):
        table.add_column(col)
    for prompt, weights, text in zip(prompts, result.compositions() or [], result.texts):
        chosen = ", ".join(f"{name} {w:.2f}" for name, w in weights.items() if abs(w) > 0.01)
        table.add_row(prompt, chosen, text)
    console.print(table)
    gated.detach()
    return accuracy
