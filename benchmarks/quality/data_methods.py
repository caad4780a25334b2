"""Merging with a little data (issue 11), measured on the same adapters and test examples as every other method.

How the methods plug in (they are written on other branches; whatever is not installed is reported as
"not available", never a crash):

- **Data-informed registry methods** (``DATA_METHODS``: RegMean, RegMean++, Fisher, AdaMerging): run through
  ``loramerge.merging.engine.merge`` like any method, with the recipe key ``data: {adapter name: file}``
  naming one JSONL file per task (``{"task", "text"}`` lines: the first ``calib_unlabeled`` *training* prompts,
  unlabeled). Calibration statistics are the methods' own business (cached by them, keyed by base model,
  adapter and data sha256). Hyperparameters: the method's ``lambda`` grid when it has one, else its defaults,
  chosen on validation like every other method.
- **LiNeS** (``post: lines``): a data-free post-step applied to the best data-free methods.
- **``loramerge tune``**: ``TUNERS`` lists where the tuner's API may live; it is called with the adapters, a
  labeled validation file (``{"task", "prompt", "options", "label"}``, ``tune_val`` examples per task from the
  validation split, never test) and a budget in minutes, and must write the best merged adapter to ``output``.

Each record carries its data budget: how many unlabeled and labeled examples per task the method saw
(every method, data-free ones included, also used the validation split to choose its hyperparameters)."""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Mapping
from pathlib import Path

from loramerge.core.adapter import load_adapter
from loramerge.merging.engine import merge as merge_fn
from loramerge.merging.methods import REGISTRY

from .bench import Bench, log
from .evaluate import _same, choose_and_test, grid_for, test_record

DATA_METHODS = ("regmean", "regmean_plus", "fisher", "adamerging")
LINES_ON = ("task_arithmetic", "ties", "tsv", "iso_cts")
TUNERS = ("loramerge.tuning:tune", "loramerge.tune:tune", "loramerge.merging.tune:tune")


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


def stage_data_methods(bench: Bench, paths: Mapping[str, Path]) -> None:
    s = bench.settings
    calib, _ = write_data_files(bench, bench.cache / "data")
    adapters = _adapters(bench, paths)
    budget = {"unlabeled_per_task": s.calib_unlabeled, "labeled_per_task": 0, "val_per_task_for_choice": s.n_val}
    for name in DATA_METHODS:
        if bench.results.get("data_merge", name, "error") is None and bench.results.get("data_merge", name):
            continue
        method = REGISTRY.get(name)
        if method is None:
            bench.results.put("data_merge", name, value={"available": False,
                                                          "reason": "not in loramerge's method registry"})
            log(f"  data-informed {name}: not available")
            continue
        log(f"data-informed merge: {name}")

        def merge_once(params, seed, _name=name):
            return merge_fn(adapters=adapters, method=_name, parameters=params, seed=seed, data=calib)
        try:
            t0 = time.perf_counter()
            random = not _same(merge_once({}, 0), merge_once({}, 1))
            record = {"available": True, "kind": method.kind, "budget": budget,
                      **choose_and_test(bench, merge_once, grid_for(method, s.lambda_grid), random, "lora"),
                      "stage_seconds": time.perf_counter() - t0}
            bench.results.put("data_merge", name, value=record)
            log(f"  {name}: params {record['params']} avg normalized {record['avg_normalized']:.3f}")
        except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
            bench.results.put("data_merge", name, value={"available": True, "error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name} FAILED: {exc}")


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
            log(f"  {key}: not available ({exc})")
            continue
        bench.results.put("merge", key, value=record)
        log(f"  {key}: avg normalized {record['avg_normalized']:.3f}")


def find_tuner():
    for spec in TUNERS:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            continue
        if callable(fn):
            return spec, fn
    return None, None


def stage_tune(bench: Bench, paths: Mapping[str, Path]) -> None:
    """``loramerge tune`` under the settings' budget on the labeled validation file; its best adapter is
    evaluated on test like every merge."""
    s = bench.settings
    if bench.results.get("tune", "avg_normalized") is not None:
        return
    spec, tune = find_tuner()
    if tune is None:
        bench.results.put("tune", value={"available": False, "reason": f"no tuner API at {', '.join(TUNERS)}"})
        log("  tune: not available")
        return
    _, val = write_data_files(bench, bench.cache / "data")
    out = bench.cache / "tune" / f"budget{s.tune_minutes:g}min"
    kwargs = {"adapters": [str(paths[t]) for t in bench.names], "data": str(val), "output": str(out),
              "budget_minutes": s.tune_minutes, "seed": s.seed, "force": True}
    accepted = inspect.signature(tune).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        t0 = time.perf_counter()
        tune(**kwargs)
        seconds = time.perf_counter() - t0
        adapter = load_adapter(str(out))
        deltas = {m: (f.B, f.A) for m in adapter.modules for f in [adapter.factors(m)]}
        record = test_record(bench, lambda p, seed: _Fixed(module_deltas_from(deltas)), {}, False,
                             bench.finetuned("lora", "test"))
        record.update({"available": True, "api": spec, "budget": {"labeled_per_task": s.tune_val,
                       "minutes": s.tune_minutes, "unlabeled_per_task": 0}, "tune_seconds": seconds})
        bench.results.put("tune", value=record)
        log(f"  tune: avg normalized {record['avg_normalized']:.3f} in {seconds:.0f}s")
    except Exception as exc:  # noqa: BLE001
        bench.results.put("tune", value={"available": True, "api": spec, "error": f"{type(exc).__name__}: {exc}"})
        log(f"  tune FAILED: {exc}")


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

