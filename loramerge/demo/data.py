"""Validation and test data for the demo's four toy tasks, and scores of merged adapters on them.

``python -m loramerge.demo.data demo_out`` writes ``demo_out/val.jsonl`` and ``demo_out/test.jsonl``:
multiple-choice lines ``{"task", "prompt", "options", "label"}`` asking which word continues a window of
the task's word cycle (the right one and three words of other tasks), from disjoint seeds (the demo's own
held-out loss uses seed 99; validation uses 7, test 11). ``--score DIR ...`` prints each adapter's mean
normalized test accuracy (its accuracy per task over the task's own adapter's), loaded by PEFT.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from loramerge.demo.run import TASKS, task_sequences

SPLIT_SEEDS = {"val": 7, "test": 11}


def _next_word(task: str, words: list[str]) -> str:
    cycle = TASKS[task]
    for offset in range(len(cycle)):
        if all(cycle[(offset + k) % len(cycle)] == w for k, w in enumerate(words)):
            return cycle[(offset + len(words)) % len(cycle)]
    raise ValueError(f"{words} is not a window of task {task}")


def choice_rows(task: str, n: int, seed: int, window: int = 6) -> list[dict]:
    rng = random.Random(f"choice-{task}-{seed}")
    vocab = sorted({w for cycle in TASKS.values() for w in cycle})
    rows = []
    for text in task_sequences(task, n, length=window, seed=seed):
        words = text.split()
        answer = _next_word(task, words)
        options = [answer, *rng.sample([w for w in vocab if w != answer], 3)]
        rng.shuffle(options)
        rows.append({"task": task, "prompt": text, "options": [" " + o for o in options],
                     "label": options.index(answer)})
    return rows


def write_demo_data(workdir: str | Path, n: int = 40) -> dict[str, Path]:
    """``val.jsonl`` and ``test.jsonl`` in ``workdir`` (n examples per task each)."""
    out = {}
    for split, seed in SPLIT_SEEDS.items():
        path = Path(workdir) / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for t in TASKS for r in choice_rows(t, n, seed)))
        out[split] = path
    return out


def normalized_scores(base: str | Path, adapters: dict[str, Path], candidates: list[Path],
                      data: str | Path) -> dict[str, dict[str, float]]:
    """Per candidate adapter: accuracy per task / the task's own adapter's accuracy, and their mean."""
    import torch
    from peft import PeftModel

    from loramerge.data.examples import read_examples
    from loramerge.data.scoring import ValidationTask
    from loramerge.data.tune import load_causal_lm

    model, tokenizer = load_causal_lm(base)
    examples = read_examples(data, tasks=list(adapters))
    encoded = {t: ValidationTask.from_examples(t, examples[t]).encode(tokenizer) for t in adapters}

    def accuracy(path: Path, tasks: list[str]) -> dict[str, float]:
        nonlocal model
        peft_model = PeftModel.from_pretrained(model, str(path)).eval()
        try:
            with torch.no_grad():
                return {t: encoded[t].score(peft_model) for t in tasks}
        finally:
            model = peft_model.unload()

    own = {t: accuracy(p, [t])[t] for t, p in adapters.items()}
    out = {}
    for cand in candidates:
        acc = accuracy(cand, list(adapters))
        per_task = {t: acc[t] / own[t] if own[t] > 0 else acc[t] for t in adapters}
        out[str(cand)] = {**per_task, "mean": sum(per_task.values()) / len(per_task)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path, help="the demo's work directory (loramerge demo -w DIR)")
    parser.add_argument("--score", nargs="*", type=Path, default=None,
                        help="merged adapter directories to score on test.jsonl")
    args = parser.parse_args(argv)
    if args.score is None:
        for split, path in write_demo_data(args.workdir).items():
            print(f"{split}: {path}")
        return
    adapters = {t: args.workdir / "adapters" / t for t in TASKS}
    scores = normalized_scores(args.workdir / "base", adapters, args.score, args.workdir / "test.jsonl")
    for cand, row in scores.items():
        cells = "  ".join(f"{t} {row[t]:.3f}" for t in TASKS)
        print(f"{cand}: mean normalized test accuracy {row['mean']:.3f}  ({cells})")


if __name__ == "__main__":
    main()
