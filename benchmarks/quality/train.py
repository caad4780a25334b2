"""Base accuracy and the adapters: one all-layer LoRA per task (plain, OSRM, LoRI-D), cached by content."""

from __future__ import annotations

import time
from pathlib import Path

from .bench import Bench, adapter_deltas, log
from .cache import content_key
from .model import TARGETS, target_regex, train_lora
from .tasks import SPECS


def stage_base(bench: Bench) -> None:
    """The base model's accuracy, and the majority class and chance level of every task."""
    for d in bench.tasks:
        if bench.results.get("base", d.short, "test_correct") is not None:
            continue
        correct = {p: bench.correct({}, p, only=d.short)[d.short] for p in ("val", "test")}
        label, majority = d.majority()
        record = {"val": sum(correct["val"]) / len(correct["val"]), "test": sum(correct["test"]) / len(correct["test"]),
                  "test_correct": correct["test"], "majority_label": label, "majority": majority, "chance": d.chance()}
        bench.results.put("base", d.short, value=record)
        log(f"base {d.short}: val {record['val']:.3f} test {record['test']:.3f} majority {majority:.3f}")


def task_steps(bench: Bench, short: str) -> int:
    """Training steps of one task: the settings' steps times the task's ``step_factor``."""
    return SPECS[short].step_factor * bench.settings.steps


def training_key(bench: Bench, short: str) -> dict:
    """The settings an adapter depends on; a task's own step count replaces the default (only then, so the
    other tasks' cached adapters keep their keys)."""
    return {**bench.settings.training_key(), "steps": task_steps(bench, short)}


def adapter_dir(bench: Bench, kind: str, short: str, **extra) -> Path:
    """cache/adapters/<kind>/<task>-<key>: the key covers the training settings, the task's training data,
    the model and whatever the initialisation reads (``extra``)."""
    d = next(t for t in bench.tasks if t.short == short)
    key = content_key(kind=kind, settings=training_key(bench, short), data=d.digest("train"),
                      model=bench.evals.model_digest, **extra)
    return bench.cache / "adapters" / kind / f"{short}-{key[:16]}"


def stage_train(bench: Bench, kind: str = "lora", peft_wrap=None, extra=None) -> dict[str, Path]:
    """One adapter per task (cached); records training time and fine-tuned val / test correctness."""
    s = bench.settings
    paths = {}
    for d in bench.tasks:
        out = adapter_dir(bench, kind, d.short, **(extra(d) if extra else {}))
        if not (out / "adapter_model.safetensors").exists():
            log(f"training {kind} for {d.short}")
            out.parent.mkdir(parents=True, exist_ok=True)
            info = train_lora(bench.lm, bench.enc[d.short]["train"], out, rank=s.rank, alpha=s.alpha,
                              steps=task_steps(bench, d.short),
                              batch_size=s.batch_size, lr=s.lr, seed=s.seed, base_path=str(bench.model_path),
                              peft_wrap=peft_wrap(d) if peft_wrap else None, layers=s.lora_layers)
            bench.results.put("training", kind, d.short, value=info)
            log(f"  {info}")
        paths[d.short] = out
        if bench.results.get("finetuned", kind, d.short, "adapter") != str(out):
            deltas = adapter_deltas(out)
            correct = {p: bench.correct(deltas, p, only=d.short)[d.short] for p in ("val", "test")}
            record = {**{p: sum(v) / len(v) for p, v in correct.items()},
                      **{f"{p}_correct": v for p, v in correct.items()}, "adapter": str(out)}
            bench.results.put("finetuned", kind, d.short, value=record)
            log(f"  fine-tuned {kind} {d.short}: val {record['val']:.3f} test {record['test']:.3f}")
    return paths


def osrm(bench: Bench):
    """OSRM (loramerge.training.osrm, the paper's covariance form): each task's A = the directions of least
    input energy over the *other* tasks' prompts (unlabeled), on the base model; B = 0; A trained."""
    from loramerge.training.osrm import compute_osrm_init, prepare_osrm_model

    s = bench.settings

    def others(data):
        return {d.short: [e.prompt for e in d.train[: s.osrm_samples]] for d in bench.tasks if d.short != data.short}

    def for_task(data):
        def wrap(model):
            t0 = time.perf_counter()
            init = compute_osrm_init(model, others(data), tokenizer=bench.lm.tokenizer, r=s.rank,
                                     target_modules=target_regex(s.lora_layers), max_samples=s.osrm_samples,
                                     max_length=s.max_length, batch_size=16)
            ratios = list(init.energy_ratio.values())
            bench.results.put("osrm_init", data.short, value={
                "seconds": time.perf_counter() - t0, "modules": len(ratios), "tokens": init.tokens,
                "mean_energy_ratio": sum(ratios) / len(ratios), "max_energy_ratio": max(ratios)})
            return prepare_osrm_model(model, init, lora_alpha=s.alpha, freeze_A=False)
        return wrap

    return for_task, lambda data: {"others": sorted(others(data).items()), "osrm_samples": s.osrm_samples}


def lori(bench: Bench):
    """LoRI-D (loramerge.training.lori): A drawn from a per-task seed and frozen, only B trained."""
    from loramerge.training.lori import LoriSpec, lori_model

    s = bench.settings

    def spec(data):
        return LoriSpec(seed=1000 + bench.names.index(data.short), r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0,
                        target_modules=TARGETS)

    layers = {"layers_to_transform": list(s.lora_layers)} if s.lora_layers else {}
    return (lambda data: lambda model: lori_model(model, spec(data), task_type="CAUSAL_LM", **layers),
            lambda data: {"lori_seed": 1000 + bench.names.index(data.short)})
