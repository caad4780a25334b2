"""Merging with a little data (issue 11), measured on the same adapters and test examples as every other method.

How the methods plug in (they are written on other branches; whatever is not installed is reported as
"not available", never a crash):

- **Data-informed registry methods** (``DATA_METHODS``: RegMean, RegMean++, Fisher, AdaMerging): run through
  ``loramerge.merging.engine.merge`` like any method. Their data: one JSONL file per task (``{"task", "text"}``
  lines: the first ``calib_unlabeled`` *training* prompts, unlabeled). Methods whose registry ``data`` is a
  statistics kind (``gram``, ``fisher``) get ``calibration: DIR`` from one ``loramerge.data.calibration.calibrate``
  call (cached by content); AdaMerging gets its coefficients from ``routers.adamerging.learn_coefficients``
  (entropy objective on the same unlabeled prompts) as parameters; any other gets ``data: {name: file}`` and
  ``base_model``. Hyperparameters: the method's ``lambda`` grid when it has one, else its defaults, chosen on
  validation like every other method.
- **LiNeS** (``post: lines``): a data-free post-step applied to the best data-free methods.
- **``loramerge tune``**: the CLI verb, run as a user would (``name=path`` adapters, ``--data`` a labeled
  validation file of ``{"task", "prompt", "options", "label"}`` lines, ``tune_val`` per task from the validation
  split, never test; ``--minutes`` the budget); its ``OUTPUT/adapter`` is evaluated on test.

Each record carries its data budget: how many unlabeled and labeled examples per task the method saw
(every method, data-free ones included, also used the validation split to choose its hyperparameters)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from loramerge.core.adapter import load_adapter
from loramerge.merging.engine import merge as merge_fn
from loramerge.merging.methods import REGISTRY

from .bench import Bench, log
from .cache import content_key, file_digest
from .evaluate import _same, choose_and_test, grid_for, test_record

DATA_METHODS = ("regmean", "regmean_plus", "fisher", "adamerging")
LINES_ON = ("task_arithmetic", "ties", "tsv", "iso_cts")
TUNE_METHODS = ("task_arithmetic", "ties", "tsv", "iso_c", "regmean")
"""What ``loramerge tune`` searches here: its data-free defaults' strongest families plus RegMean (calibrated once
by the tuner on the labeled validation prompts, inside the budget), as a user holding a validation set would."""


def write_data_files(bench: Bench, root: Path) -> tuple[dict[str, str], Path]:
    """Per-task unlabeled calibration files and one labeled validation file for the tuner."""
    s = bench.settings
    root.mkdir(parents=True, exist_ok=True)
    calib = {}
    for d in bench.tasks:
        path = root / f"calib_{d.short}.jsonl"
        path.write_text("".join(json.dumps({"task": d.short, "text": e.prompt}) + "\n"
                                for e in d.train[: s.calib_unlabeled]))
        calib[d.short] = str(path)
    val = root / "tune_val.jsonl"
    val.write_text("".join(json.dumps({"task": d.short, "prompt": e.prompt, "options": list(e.options),
                                       "label": e.answer}) + "\n" for d in bench.tasks for e in d.val[: s.tune_val]))
    return calib, val


def _adapters(bench: Bench, paths: Mapping[str, Path]) -> list[dict]:
    return [{"path": str(paths[t]), "name": t} for t in bench.names]


def _calibration(bench: Bench, paths: Mapping[str, Path], calib: Mapping[str, str]) -> tuple[Path, float] | None:
    """``loramerge calibrate`` once (Grams and Fisher factors of each adapter's model on its own unlabeled
    prompts), keyed by content; None when the API is not installed."""
    try:
        from loramerge.data.calibration import calibrate
    except ImportError:
        return None
    key = content_key(model=bench.evals.model_digest, max_length=bench.settings.max_length,
                      adapters={t: file_digest(paths[t] / "adapter_model.safetensors") for t in bench.names},
                      data={t: file_digest(Path(f)) for t, f in calib.items()})
    out = bench.cache / "calibration" / key[:16]
    if out.exists():
        return out, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calibrate(str(bench.model_path), {t: str(paths[t]) for t in bench.names}, dict(calib), out, fisher=True,
              max_length=bench.settings.max_length, show_progress=False)
    return out, time.perf_counter() - t0


def _adamerging(bench: Bench, paths: Mapping[str, Path]) -> dict:
    """AdaMerging's learned coefficients (routers.adamerging, entropy of the option distribution on the
    unlabeled training prompts; labels never read) as the method's recipe parameters."""
    from loramerge.data.scoring import ValidationTask
    from routers.adamerging import learn_coefficients

    s = bench.settings
    tasks = [ValidationTask(d.short, "choice", tuple(e.prompt for e in d.train[: s.calib_unlabeled]),
                            tuple(e.options for e in d.train[: s.calib_unlabeled]),
                            tuple(e.answer for e in d.train[: s.calib_unlabeled])) for d in bench.tasks]
    result = learn_coefficients(bench.lm.model, bench.lm.tokenizer, [str(paths[t]) for t in bench.names], tasks,
                                names=bench.names, objective="entropy", seed=s.seed, max_length=s.max_length,
                                steps=s.ada_steps)
    return result.parameters()


def stage_data_methods(bench: Bench, paths: Mapping[str, Path]) -> None:
    s = bench.settings
    calib, _ = write_data_files(bench, bench.cache / "data")
    adapters = _adapters(bench, paths)
    budget = {"unlabeled_per_task": s.calib_unlabeled, "labeled_per_task": 0, "val_per_task_for_choice": s.n_val}
    statistics = None
    for name in DATA_METHODS:
        if bench.results.get("data_merge", name, "correct") is not None:
            continue
        method = REGISTRY.get(name)
        if method is None:
            bench.results.put("data_merge", name, value={"available": False,
                                                          "reason": "not in loramerge's method registry"})
            log(f"  data-informed {name}: not available")
            continue
        log(f"data-informed merge: {name}")
        try:
            t0 = time.perf_counter()
            learned: dict = {}
            recipe: dict = {"data": calib, "base_model": str(bench.model_path)}
            if name == "adamerging":
                learned = _adamerging(bench, paths)
                recipe = {}
            elif getattr(method, "data", "none") in ("gram", "fisher"):
                statistics = statistics or _calibration(bench, paths, calib)
                if statistics is not None:
                    recipe = {"calibration": str(statistics[0])}
                    bench.results.put("calibration", value={"dir": str(statistics[0]), "seconds": statistics[1]})

            def merge_once(params, seed, _name=name, _learned=learned, _recipe=recipe):
                return merge_fn(adapters=adapters, method=_name, parameters={**_learned, **params}, seed=seed,
                                **_recipe)
            random = not _same(merge_once({}, 0), merge_once({}, 1))
            record = {"available": True, "kind": method.kind, "budget": budget,
                      **choose_and_test(bench, merge_once, grid_for(method, s.lambda_grid), random, "lora"),
                      "stage_seconds": time.perf_counter() - t0, "learned_parameters": learned or None}
            bench.results.put("data_merge", name, value=record)
            log(f"  {name}: params {record['params']} avg normalized {record['avg_normalized']:.3f}")
        except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
            bench.results.put("data_merge", name, value={"available": True, "error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name} FAILED: {type(exc).__name__}: {exc}")


def stage_lines(bench: Bench, paths: Mapping[str, Path]) -> None:
    """LiNeS as a post-step (``post: lines``) on a few data-free methods at their chosen hyperparameters."""
    names = [str(paths[t]) for t in bench.names]
    for base in LINES_ON:
        key = f"{base}+lines"
        chosen = bench.results.get("merge", base)
        if chosen is None or "error" in chosen or bench.results.get("merge", key) is not None:
            continue
        try:
            record = {"kind": "post-step", "exact": False, "val_grid": {"reused from": base},
                      **test_record(bench, lambda p, s, _b=base: merge_fn(adapters=names, method=_b, parameters=p,
                                                                          seed=s, post="lines"),
                                    chosen["params"], chosen["random"], bench.finetuned("lora", "test"))}
        except Exception as exc:  # noqa: BLE001
            bench.results.put("merge_unavailable", key, value=f"{type(exc).__name__}: {exc}")
            log(f"  {key}: not available ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        bench.results.put("merge", key, value=record)
        log(f"  {key}: avg normalized {record['avg_normalized']:.3f}")


def tuner_command() -> list[str] | None:
    """The ``loramerge tune`` command of this environment, or None when the verb is not installed."""
    exe = Path(sys.executable).with_name("loramerge")
    if not exe.exists():
        return None
    probe = subprocess.run([str(exe), "tune", "--help"], capture_output=True, text=True, check=False)
    return [str(exe), "tune"] if probe.returncode == 0 else None


def stage_tune(bench: Bench, paths: Mapping[str, Path]) -> None:
    """``loramerge tune`` (the CLI, the user's interface) under the settings' budget on the labeled validation
    file; its best adapter (``OUTPUT/adapter``) is evaluated on test like every merge."""
    s = bench.settings
    if bench.results.get("tune", "correct") is not None:
        return
    command = tuner_command()
    reason = "no `loramerge tune` verb installed" if command is None else None
    if command is not None and importlib.util.find_spec("optuna") is None:
        reason = "optuna is not installed (`.venv/bin/pip install optuna`)"
    if reason:
        bench.results.put("tune", value={"available": False, "reason": reason})
        log(f"  tune: not available ({reason})")
        return
    _, val = write_data_files(bench, bench.cache / "data")
    out = bench.cache / "tune" / content_key(
        model=bench.evals.model_digest, minutes=s.tune_minutes, seed=s.seed, data=file_digest(val), methods=TUNE_METHODS,
        adapters={t: file_digest(paths[t] / "adapter_model.safetensors") for t in bench.names})[:16]
    command += [f"{t}={paths[t]}" for t in bench.names] + [
        "--data", str(val), "--output", str(out), "--base", str(bench.model_path), "--minutes", f"{s.tune_minutes:g}",
        "--seed", str(s.seed), "--max-length", str(s.max_length), "--ada-steps", str(s.ada_steps),
        "--methods", ",".join(TUNE_METHODS), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads)}
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not (out / "adapter").exists():
        bench.results.put("tune", value={"available": True, "command": " ".join(command),
                                         "error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"})
        log(f"  tune FAILED (exit {done.returncode})")
        return
    adapter = load_adapter(str(out / "adapter"))
    deltas = {m: (f.B, f.A) for m in adapter.modules for f in [adapter.factors(m)]}
    record = test_record(bench, lambda p, seed: _Fixed(module_deltas_from(deltas)), {}, False,
                         bench.finetuned("lora", "test"))
    report = out / "report.json"
    record.update({"available": True, "api": "loramerge tune", "command": " ".join(command),
                   "budget": {"labeled_per_task": s.tune_val, "minutes": s.tune_minutes, "unlabeled_per_task": 0},
                   "tune_seconds": seconds, "report": json.loads(report.read_text()) if report.exists() else None})
    bench.results.put("tune", value=record)
    log(f"  tune: avg normalized {record['avg_normalized']:.3f} in {seconds:.0f}s")


class _Module:
    def __init__(self, name, B, A):
        self.name, self.B, self.A = name, B, A


class _Report:
    rank = 0


class _Fixed:
    """A merge-result look-alike around fixed deltas (what ``test_record`` reads)."""

    def __init__(self, modules):
        self.modules = modules
        self.seconds = 0.0
        self.reports = [_Report()]
        self.max_rel_error = 0.0
        for m in modules:
            self.reports[0].rank = max(self.reports[0].rank, m.A.shape[0])


def module_deltas_from(deltas) -> list[_Module]:
    return [_Module(n, B, A) for n, (B, A) in deltas.items()]

