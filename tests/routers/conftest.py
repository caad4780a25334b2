"""A small world of separable tasks for router tests: word sets, a tiny Llama, and LoRAs trained on each task."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loramerge.demo.toy import make_tokenizer, tiny_llama

TASK_WORDS = {
    "numbers": "one two three four five six seven eight nine ten number sum add".split(),
    "animals": "cat dog bird fish small big red green blue sing play".split(),
    "code": "code python function return value list sort loop print run".split(),
}
TASKS = list(TASK_WORDS)


def task_texts(task: str, n: int, seed: int, length: tuple[int, int] = (6, 10)) -> list[str]:
    """``n`` sentences of words drawn from the task's own word set."""
    rng = random.Random(f"{task}-{seed}")
    words = TASK_WORDS[task]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) for _ in range(n)]


def labelled(n_per_task: int, seed: int) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for task in TASKS:
        texts += task_texts(task, n_per_task, seed)
        labels += [task] * n_per_task
    return texts, labels


def train_task_lora(base, tokenizer, task: str, out_dir: Path, *, steps: int = 30, seed: int = 0) -> Path:
    """A real task adapter: LoRA on the tiny model trained with the LM loss on the task's sentences."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"], lora_dropout=0.0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    texts = task_texts(task, 64, seed=100 + seed)
    tokenizer.padding_side = "right"
    model.train()
    for step in range(steps):
        batch = tokenizer(texts[(step * 16) % 64:(step * 16) % 64 + 16], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.peft_config["default"].base_model_name_or_path = "tiny-llama-tasks"
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return out_dir


@dataclass
class TaskWorld:
    base: torch.nn.Module
    tokenizer: object
    adapters: dict[str, Path]

    @property
    def paths(self) -> list[Path]:
        return [self.adapters[t] for t in TASKS]

    def fresh_model(self):
        return copy.deepcopy(self.base)


@pytest.fixture(scope="session")
def task_world(tmp_path_factory) -> TaskWorld:
    tokenizer = make_tokenizer()
    base = tiny_llama(seed=7, hidden=64, layers=2, vocab=96)
    root = tmp_path_factory.mktemp("task-adapters")
    adapters = {task: train_task_lora(base, tokenizer, task, root / task, seed=i) for i, task in enumerate(TASKS)}
    return TaskWorld(base=base, tokenizer=tokenizer, adapters=adapters)
