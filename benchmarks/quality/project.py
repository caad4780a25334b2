"""How long a full run takes: measure the unit costs on this machine, count the work of every stage.

``.venv/bin/python -m benchmarks.quality.project [--examples 32] [--steps 4]`` measures the CPU seconds per
evaluated example (option scoring, per task) and per training step (all-layer LoRA, batch of the settings)
with one thread, converts them to wall seconds on 2 idle cores (``SPEEDUP_2_THREADS``),
then multiplies by the number of evaluations and steps each stage of a full run performs (from the
settings and the method registry). The load average is printed with it: on a shared machine the unit costs,
and so the projection, scale with it."""

from __future__ import annotations

import argparse
import os
import time

import torch

from loramerge.merging.methods import REGISTRY

from .settings import Settings
from .tasks import TASKS

RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "lora_lego")
"""Methods expected to change with the seed by more than ``evaluate._same``'s 5% (random drops, k-means
initialisation); ``is_random`` decides at run time. Tested with every seed."""
SPEEDUP_2_THREADS = 1.7
"""Wall-clock speed-up of 2 torch threads over 1 on 2 idle cores (assumed, not measured here: the measurement
runs with 1 thread and divides its CPU time by this)."""
MERGE_SECONDS = {"della": 75.0, "breadcrumbs": 80.0}
"""Merge time per call on all 30 layers, projected from v1's top-4-layer timings x 7.5; others take < 15 s."""


def work(s: Settings, n_tasks: int = len(TASKS)) -> dict[str, dict[str, float]]:
    """Examples evaluated, training steps and merge seconds of every stage of a full run from an empty cache
    (mirrors evaluate.py / compose.py / data_methods.py; a prompt-only pass counts as 0.8 of an example)."""
    val, test = s.n_val * n_tasks, s.n_test * n_tasks
    seeds = len(s.random_seeds)
    grid = len(s.lambda_grid)
    methods = [n for n, m in REGISTRY.items() if getattr(m, "data", "none") == "none"] + ["task_arithmetic+factorwise"]
    gridded = [m for m in methods if m.split("+")[0] not in ("average", "cat")]

    def passes(m: str) -> tuple[int, int]:
        return (grid if m in gridded else 0), (seeds if m in RANDOM_METHODS else 1)

    merge_evals = sum(passes(m)[0] * val + passes(m)[1] * test for m in methods) + (1 + seeds) * test
    merge_s = sum(MERGE_SECONDS.get(m, 5.0) * (sum(passes(m)) + 2) for m in methods)  # + 2: is_random
    ortho = 4  # evaluate.ORTHOGONAL_METHODS + the best plain method, at the plain LoRAs' point, no val pass
    finetuned = val + test
    return {
        "base": {"examples": val + test},
        "train_lora": {"steps": n_tasks * s.steps, "examples": finetuned},
        "merge_sweep": {"examples": merge_evals, "merge_seconds": merge_s},
        "data_methods (4, if installed)": {"examples": 4 * (grid * val + test), "merge_seconds": 4 * grid * 20,
                                           "fixed_seconds": 300},
        "lines (4 post-steps)": {"examples": 4 * test},
        "tune (if installed)": {"fixed_seconds": 60 * s.tune_minutes + 60, "examples": test},
        "rmm (4 bases)": {"examples": 4 * test},
        "twin (3 bundles)": {"examples": 4 * test},
        "routers (3; own-task routes cached)": {"examples": 0.8 * (s.router_train * n_tasks + test) + 0.1 * test},
        "tokens (5; 3 trained)": {"examples": 5 * 1.3 * (test + 0.8 * 100 * n_tasks), "steps": 3 * s.gate_steps * 1.3},
        "osrm": {"steps": n_tasks * s.steps, "examples": finetuned + ortho * test * 1.25, "fixed_seconds": 120},
        "lori": {"steps": n_tasks * s.steps, "examples": finetuned + ortho * test * 1.25},
    }


def measure(examples: int, steps: int, s: Settings) -> tuple[float, float]:
    from peft import get_peft_model

    from .assets import load_model_and_tokenizer
    from .model import LM, lora_config
    from .tasks import load_task_data

    model, tokenizer = load_model_and_tokenizer()
    lm = LM(model, tokenizer, max_length=s.max_length)
    tasks = load_task_data(TASKS, n_train=max(64, s.batch_size), n_val=0, n_test=examples, seed=s.seed)
    total, count = 0.0, 0
    for d in tasks:
        enc = lm.encode(d.test)
        t0 = time.process_time()
        lm.correct(enc)
        seconds = time.process_time() - t0
        print(f"  eval {d.short}: {seconds / len(enc):.3f} CPU s/example", flush=True)
        total, count = total + seconds, count + len(enc)
    train = [e for d in tasks for e in lm.encode(d.train)]
    peft_model = get_peft_model(lm.model, lora_config(s.rank, s.alpha))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=s.lr)
    lm.model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.process_time()
        loss = lm.answer_loss(train[i * s.batch_size: (i + 1) * s.batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - t0)
    lm.model.eval()
    peft_model.unload()
    # CPU seconds (process time) resist the machine's load far better than wall time; 2 idle cores run them
    # about SPEEDUP_2_THREADS x faster than 1 thread
    return total / count / SPEEDUP_2_THREADS, sum(times[1:]) / steps / SPEEDUP_2_THREADS  # step 0 warms up


def project(s_per_example: float, s_per_step: float, s: Settings) -> list[tuple[str, float]]:
    rows = []
    for stage, w in work(s).items():
        seconds = (w.get("examples", 0) * s_per_example + w.get("steps", 0) * s_per_step
                   + w.get("merge_seconds", 0) + w.get("fixed_seconds", 0))
        rows.append((stage, seconds))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=32, help="test examples per task to time")
    parser.add_argument("--steps", type=int, default=4, help="training steps to time")
    parser.add_argument("--s-per-example", type=float, help="skip measuring: use this")
    parser.add_argument("--s-per-step", type=float, help="skip measuring: use this")
    args = parser.parse_args(argv)
    s = Settings()
    torch.set_num_threads(1)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.s_per_example is None or args.s_per_step is None:
        per_example, per_step = measure(args.examples, args.steps, s)
    else:
        per_example, per_step = args.s_per_example, args.s_per_step
    print(f"load average {load} -> {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{per_example:.3f} s per evaluated example, {per_step:.2f} s per training step (batch {s.batch_size}), "
          "wall seconds projected for 2 idle cores")
    rows = project(per_example, per_step, s)
    cached = {"train_lora", "osrm", "lori"}
    for stage, seconds in rows:
        print(f"  {stage:32s} {seconds / 60:7.1f} min")
    total = sum(x for _, x in rows)
    steps_s = sum(w.get("steps", 0) for k, w in work(s).items() if k in cached) * per_step
    print(f"  {'total from an empty cache':32s} {total / 60:7.1f} min")
    print(f"  {'total with cached adapters':32s} {(total - steps_s) / 60:7.1f} min (evaluations not cached)")


if __name__ == "__main__":
    main()
