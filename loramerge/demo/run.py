"""`loramerge demo`: everything local, in about a minute on a laptop CPU.

It builds a tiny Llama and trains four LoRA adapters on four toy tasks (each task
continues its own cycle of words), merges them with several methods, prints a
table (rank, size, reconstruction error, time, per-task loss), draws it, loads
the best merge with PEFT and generates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console

from loramerge.analysis.compare import CompareRow, LossEvaluator, compare_methods, plot_rows, render_table
from loramerge.demo.toy import make_tokenizer, save_base, tiny_llama

TASKS: dict[str, list[str]] = {
    "count": "one two three four five six seven eight nine ten".split(),
    "colors": "red green blue small big red blue green big small".split(),
    "animals": "cat dog bird fish cat bird dog fish".split(),
    "code": "python function return value print loop list sort".split(),
}


def task_sequences(task: str, n: int, length: int = 10, seed: int = 0) -> list[str]:
    """Windows of the task's word cycle, starting at random offsets."""
    cycle = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    out = []
    for _ in range(n):
        start = rng.randrange(len(cycle))
        out.append(" ".join(cycle[(start + i) % len(cycle)] for i in range(length)))
    return out


def write_task_data(workdir: Path, *, n: int = 32) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl`` of {"text", "task"} lines (what ``route train``/``compare --data`` read)."""
    paths = []
    for name, seed in (("train", 1), ("test", 99)):
        path = Path(workdir) / f"{name}.jsonl"
        rows = [{"text": text, "task": task} for task in TASKS for text in task_sequences(task, n, seed=seed)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


def train_adapter(base_dir: Path, task: str, out_dir: Path, *, steps: int = 60, r: int = 8, seed: int = 0) -> Path:
    """Train a LoRA on one toy task with PEFT (all attention and MLP projections)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = task_sequences(task, 256, seed=seed)
    model.train()
    for step in range(steps):
        batch = tok(random.Random(step).sample(data, 16), return_tensors="pt", padding=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out_dir)
    return out_dir


DEMO_MERGES: list[tuple[str, dict]] = [
    ("task_arithmetic", {"rank": "exact"}),
    ("average", {"rank": "exact"}),
    ("task_arithmetic", {"rank": 8}),
    ("ties", {"parameters": {"density": 0.3}}),
    ("dare_ties", {"parameters": {"density": 0.5}, "seed": 0}),
    ("della", {"seed": 0}),
    ("breadcrumbs", {"parameters": {"density": 0.3}}),
    ("magnitude_prune", {"parameters": {"density": 0.3}}),
    ("task_arithmetic", {"factorwise": True}),
]


def run_demo(
    workdir: Path, *, threads: int = 1, console: Console | None = None
) -> tuple[list[CompareRow], dict[str, Path]]:
    from peft import PeftModel

    console = console or Console()
    if not console.is_terminal and console.width < 140:
        console = Console(width=140)
    torch.set_num_threads(threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = workdir / "base"
    if not (base_dir / "config.json").is_file():
        save_base(tiny_llama(seed=0, hidden=64, layers=2, vocab=128, init_range=0.2), base_dir)
        make_tokenizer(base_dir)
    adapters = {}
    with console.status("training four toy-task adapters with PEFT"):
        for i, task in enumerate(TASKS):
            path = workdir / "adapters" / task
            if not (path / "adapter_model.safetensors").is_file():
                train_adapter(base_dir, task, path, seed=i)
            adapters[task] = path
    write_task_data(workdir)
    console.print(f"base model, adapters and task texts (train.jsonl, test.jsonl) in {workdir}/ "
                  "(tiny Llama, 4 LoRA adapters of rank 8 on 7 projections)")

    evaluator = LossEvaluator(base_dir, {task: task_sequences(task, 32, seed=99) for task in TASKS})
    rows = [CompareRow("base model (no adapter)", losses=evaluator(None), reference=True)]
    own = {task: evaluator(path)[task] for task, path in adapters.items()}
    rows.append(CompareRow("each task's own adapter", total_rank=8 * 14, losses=own, reference=True))
    merged = compare_methods([str(p) for p in adapters.values()], DEMO_MERGES, workdir / "merged", evaluator=evaluator,
                            force=True)  # the demo owns its work directory
    rows += merged
    title = "4 toy-task adapters merged into one (held-out LM loss per task; lower is better)"
    console.print(render_table(rows, title))
    console.print("rel. err = what the rank policy lost (0 = the merge is stored exactly); factorwise/PEFT is "
                  "PEFT's add_weighted_adapter('linear'), which averages A and B separately (cross terms).")
    plot = plot_rows(rows, workdir / "comparison.png", "loramerge demo: one adapter for four tasks")
    console.print(f"plot: {plot}" if plot else "(install matplotlib to also get comparison.png)")

    best = min(merged, key=lambda r: r.mean_loss)
    model = PeftModel.from_pretrained(evaluator.base, best.output).eval()
    tok = evaluator.tokenizer
    console.print(f"\n[bold]generating with the best merge[/] ({best.label}), loaded by PeftModel.from_pretrained:")
    for task in TASKS:
        prompt = " ".join(TASKS[task][:3])
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        console.print(f"  {prompt!r:32} -> {tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    model.unload()
    return rows, adapters
