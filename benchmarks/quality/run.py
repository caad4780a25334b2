"""Run the offline quality benchmark (v2): ``.venv/bin/python -m benchmarks.quality.run [--smoke]``.

Stages (each cached by content under benchmarks/quality/cache/): base accuracy; one all-layer LoRA per task;
every registry merge method (validation-chosen hyperparameters); the data-informed methods, LiNeS and
``loramerge tune`` (reported "not available" when not installed); RMM reconstructions; Twin-Merging bundles;
request-level and per-token routers; OSRM and LoRI-D adapters trained for the same tasks and merged; then
docs/QUALITY.md and docs/img/quality_*.png are written from cache/results.json (``--smoke``: to
cache/smoke/QUALITY.md, tiny splits and budgets, numbers meaningless)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from .assets import CACHE, load_model_and_tokenizer, plain_model_dir
from .bench import Bench, Results, log
from .cache import EvalCache, file_digest
from .model import LM
from .settings import Settings, smoke
from .tasks import TASKS, load_task_data

STAGES = ("base", "train", "exact", "merge", "data", "tune", "rmm", "twin", "routers", "tokens", "osrm", "lori",
          "report")


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": " / ".join(f"{x:.2f}" for x in os.getloadavg())}


def open_results(path: Path, settings: Settings) -> Results:
    """results.json of these settings; results measured under other settings are moved aside."""
    results = Results(path)
    current = json.loads(json.dumps(settings.as_dict()))
    stored = results.get("settings")
    if stored is not None and {k: v for k, v in stored.items() if k != "threads"} != {
            k: v for k, v in current.items() if k != "threads"}:
        archive = path.with_name(f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.replace(archive)
        log(f"settings changed: earlier results moved to {archive.name}")
        results = Results(path)
    results.put("settings", value=current)
    return results


def retire_dropped_tasks(results, current: set[str]) -> None:
    """Move the records of tasks no longer in the run (replaced for failing the fine-tuning gate) out of the
    sections every average reads, into ``replaced``: the report still shows why they were dropped."""
    for task, info in (results.get("tasks") or {}).items():
        if task in current:
            continue
        record = {"task": info, "base": (results.get("base") or {}).get(task),
                  "finetuned": (results.get("finetuned", "lora") or {}).get(task),
                  "training": (results.get("training", "lora") or {}).get(task)}
        results.put("replaced", task, value=record)
        for keys in (("base",), ("finetuned", "lora"), ("training", "lora")):
            section = results.get(*keys)
            if isinstance(section, dict) and task in section:
                del section[task]
                results.put(*keys, value=section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=Settings.threads)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (orthogonal = osrm,lori)")
    parser.add_argument("--methods", default="", help="comma-separated registry names (default: all)")
    parser.add_argument("--tasks", default="", help="comma-separated task keys of benchmarks/quality/tasks.py "
                        "(default: the six of tasks.TASKS; --smoke: three of them)")
    parser.add_argument("--smoke", action="store_true", help="tiny splits and budgets: checks every stage runs")
    parser.add_argument("--results", type=Path, help="results file (default cache/results.json; --smoke: "
                        "cache/smoke/results.json); two runs at once need two files")
    args = parser.parse_args(argv)
    settings = Settings(threads=args.threads, tasks=tuple(t for t in args.tasks.split(",") if t))
    results_path, doc = CACHE / "results.json", None
    if args.smoke:
        settings = smoke(settings) if not settings.tasks else replace(smoke(settings), tasks=settings.tasks)
        results_path, doc = CACHE / "smoke" / "results.json", CACHE / "smoke" / "QUALITY.md"
    results_path = args.results or results_path
    results_path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    stages = set(args.stages.split(","))
    if "orthogonal" in stages:
        stages |= {"osrm", "lori"}
    results = open_results(results_path, settings)
    if stages == {"report"}:
        from .report import write_report

        print(write_report(results.data, **({"doc": doc} if doc else {})))
        return
    results.put("machine", value=_machine())
    runs = results.get("runs", default=[])
    timings: dict[str, float] = {}
    runs.append({"stages": args.stages, "smoke": args.smoke, "started": _machine()["date"],
                 "load_average": _machine()["load_average"], "timings_s": timings})
    started = time.perf_counter()

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        results.put("runs", value=runs)
        return out

    def optional(name, fn, *a, **kw):
        """A later stage that fails is recorded (and reported), not allowed to stop the stages after it."""
        try:
            out = timed(name, fn, *a, **kw)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports what failed and goes on
            results.put("failures", name, value=f"{type(exc).__name__}: {exc}")
            log(f"stage {name} FAILED: {type(exc).__name__}: {exc}")
            return None
        failures = results.get("failures") or {}
        if failures.pop(name, None) is not None:  # an earlier failure of this stage is fixed
            results.put("failures", value=failures)
        return out

    model, tokenizer = timed("load_model", load_model_and_tokenizer)
    model_path = plain_model_dir()
    tasks = timed("load_tasks", load_task_data, list(settings.tasks or TASKS), n_train=settings.n_train,
                  n_val=settings.n_val, n_test=settings.n_test, seed=settings.seed)
    retire_dropped_tasks(results, {d.short for d in tasks})
    results.put("tasks", value={d.short: {"name": d.name, "family": d.family, "options": d.n_options,
                                          "train": len(d.train), "val": len(d.val), "test": len(d.test)}
                                for d in tasks})
    lm = LM(model, tokenizer, max_length=settings.max_length)
    enc = {d.short: {p: lm.encode(getattr(d, p)) for p in ("train", "val", "test")} for d in tasks}
    evals = EvalCache(CACHE / "evals", file_digest(model_path / "model.safetensors"))
    bench = Bench(lm, tasks, enc, settings, results, evals, model_path, CACHE)
    from . import compose, data_methods, evaluate, train

    if "base" in stages:
        timed("base_eval", train.stage_base, bench)
    paths = {}
    if stages & {"train", "exact", "merge", "data", "tune", "rmm", "twin", "routers", "tokens"}:
        paths = timed("train_lora", train.stage_train, bench)
    methods = [m for m in args.methods.split(",") if m] or None
    if "exact" in stages:
        optional("exact", evaluate.stage_exact, bench, paths)
    if "merge" in stages:
        timed("merge_sweep", evaluate.stage_merge, bench, paths, methods)
    if "data" in stages:
        optional("data_methods", data_methods.stage_data_methods, bench, paths)
        optional("lines", data_methods.stage_lines, bench, paths)
    if "tune" in stages:
        optional("tune", data_methods.stage_tune, bench, paths)
    for name, fn in (("rmm", compose.stage_rmm), ("twin", compose.stage_twin), ("routers", compose.stage_routers),
                     ("tokens", compose.stage_tokens)):
        if name in stages:
            optional(name, fn, bench, paths)
    for kind, make in (("osrm", train.osrm), ("lori", train.lori)):
        if kind in stages:
            wrap, extra = make(bench)
            kind_paths = optional(f"train_{kind}", train.stage_train, bench, kind, wrap, extra)
            if kind_paths:
                optional(f"merge_sweep_{kind}", evaluate.stage_merge, bench, kind_paths, None, kind)
    timings["total"] = round(time.perf_counter() - started, 1)
    results.put("eval_cache", value={"hits": evals.hits, "misses": evals.misses})
    results.put("runs", value=runs)
    if "report" in stages:
        from .report import write_report

        write_report(results.data, **({"doc": doc} if doc else {}))
    log(f"done in {timings['total']:.0f}s (evaluation cache: {evals.hits} hits, {evals.misses} misses)")


if __name__ == "__main__":
    main()
