"""BIG-bench tasks as lettered multiple choice, with fixed seeded train / validation / test splits."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .assets import read_tasks

TASKS: tuple[str, ...] = (
    "multiemo/all_sentence_en",
    "intent_recognition",
    "hyperbaton",
    "arithmetic/2_digit_addition",
    "arithmetic/2_digit_subtraction",
    "arithmetic/2_digit_multiplication",
)
"""Six of the issue's candidate tasks. Measured and left out (LoRA on the top 4 layers, 200 steps on 256
examples, test accuracy vs chance): fact_checker/fever 0.50 vs 0.50, goal_step_wikihow/step_inference 0.25 vs
0.25 (0.68 on its training examples), elementary_math_qa/question_only 0.25 vs 0.20: a fine-tuned accuracy at
chance makes normalized accuracy (merged / fine-tuned) meaningless."""
SHORT = {
    "multiemo/all_sentence_en": "multiemo",
    "fact_checker/fever": "fever",
    "intent_recognition": "intent",
    "elementary_math_qa/question_only": "math_qa",
    "hyperbaton": "hyperbaton",
    "goal_step_wikihow/step_inference": "wikihow",
    "arithmetic/2_digit_addition": "add",
    "arithmetic/2_digit_subtraction": "sub",
    "arithmetic/2_digit_multiplication": "mul",
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


def leaks_answer_position(task: dict, threshold: float = 0.5) -> bool:
    """Whether the task's listed option order gives the answer away: one position holds the best-scoring
    option in more than ``threshold`` of the examples (BIG-bench arithmetic lists the correct result last in
    90-99% of them, so a LoRA would learn the letter, not the task)."""
    positions: dict[int, int] = {}
    for example in task["examples"]:
        scores = example.get("target_scores") or {}
        if scores:
            best = max(scores.values())
            first = next(i for i, v in enumerate(scores.values()) if v == best)
            positions[first] = positions.get(first, 0) + 1
    total = sum(positions.values())
    return bool(total) and max(positions.values()) > threshold * total


def format_example(task: dict, example: dict, shuffle: random.Random | None = None) -> Example | None:
    """Prompt = task prefix + input + lettered options + 'Answer:'; the answer is the letter token.

    ``shuffle``: a seeded generator that reorders the options (for tasks whose listed order leaks the answer)."""
    scores = example.get("target_scores")
    if not scores or len(scores) > len(LETTERS):
        return None
    options = list(scores)
    if shuffle is not None:
        shuffle.shuffle(options)
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
    rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
    shuffle = random.Random(rng.random()) if leaks_answer_position(task) else None
    examples = [e for e in (format_example(task, ex, shuffle) for ex in task["examples"]) if e is not None]
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
