"""BIG-bench tasks as lettered multiple choice, with fixed seeded train / validation / test splits."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .assets import read_tasks

TASKS: tuple[str, ...] = (
    "multiemo/all_sentence_en",
    "fact_checker/fever",
    "intent_recognition",
    "elementary_math_qa/question_only",
    "hyperbaton",
    "goal_step_wikihow/step_inference",
)
SHORT = {
    "multiemo/all_sentence_en": "multiemo",
    "fact_checker/fever": "fever",
    "intent_recognition": "intent",
    "elementary_math_qa/question_only": "math_qa",
    "hyperbaton": "hyperbaton",
    "goal_step_wikihow/step_inference": "wikihow",
}
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    prompt: str
    n_options: int
    answer: int


@dataclass(frozen=True)
class TaskData:
    name: str
    short: str
    train: list[Example]
    val: list[Example]
    test: list[Example]

    @property
    def n_options(self) -> int:
        return max(e.n_options for e in self.test)


def format_example(task: dict, example: dict) -> Example | None:
    """Prompt = task prefix + input + lettered options + 'Answer:'; the answer is the letter token."""
    scores = example.get("target_scores")
    if not scores or len(scores) > len(LETTERS):
        return None
    options = list(scores)
    best = max(scores.values())
    correct = [i for i, o in enumerate(options) if scores[o] == best]
    if len(correct) != 1:
        return None
    # intent_recognition's prefix only repeats the options listed below; dropping it halves the prompt
    prefix = "" if "possible choices" in task.get("task_prefix", "") else task.get("task_prefix", "").strip()
    body = example["input"].strip()
    lines = ([prefix] if prefix else []) + [body, "Options:"]
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    lines.append("Answer:")
    return Example(prompt="\n".join(lines), n_options=len(options), answer=correct[0])


def split_task(name: str, task: dict, *, n_train: int, n_val: int, n_test: int, seed: int) -> TaskData:
    """A fixed split: shuffle with a seed derived from (seed, task name), then test, validation, train."""
    examples = [e for e in (format_example(task, ex) for ex in task["examples"]) if e is not None]
    rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
    rng.shuffle(examples)
    test = examples[:n_test]
    val = examples[n_test:n_test + n_val]
    train = examples[n_test + n_val:n_test + n_val + n_train]
    if len(train) < n_train // 2:
        raise SystemExit(f"task {name} has only {len(examples)} usable examples")
    return TaskData(name=name, short=SHORT.get(name, name), train=train, val=val, test=test)


def load_task_data(names=TASKS, *, n_train: int, n_val: int, n_test: int, seed: int = 0) -> list[TaskData]:
    raw = read_tasks(list(names))
    return [split_task(n, raw[n], n_train=n_train, n_val=n_val, n_test=n_test, seed=seed) for n in names]
