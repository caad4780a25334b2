"""Run the offline quality benchmark: ``.venv/bin/python -m benchmarks.quality.run``.

Stages (each cached under benchmarks/quality/cache/): assets, cached bottom-layer states, base accuracy,
one LoRA per task, every registry merge method, RMM reconstructions, Twin-Merging bundles, request-level
and per-token routers, OSRM and LoRI adapters trained for the same tasks and merged with the same methods;
then docs/QUALITY.md and docs/img/quality_*.png are written from cache/results.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib
from pathlib import Path

import torch

from .assets import CACHE, load_model_and_tokenizer, plain_model_dir
from .model import SplitLM, train_lora
from .settings import Settings
from .tasks import load_task_data

RESULTS = CACHE / "results.json"
STAGES = ("base", "train", "exact", "rmm", "twin", "routers", "tokens", "merge", "osrm", "lori", "report")


class Results:
    """results.json, rewritten after every step so an interrupted run keeps what it measured."""

    def __init__(self, path: Path = RESULTS):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, *keys, default=None):
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def put(self, *keys, value) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached_states(split: SplitLM, data, settings: Settings) -> dict:
    """Bottom-layer hidden states of every example, computed once per (task, split, settings)."""
    prompts = "\n".join(e.prompt for part in ("train", "val", "test") for e in getattr(data, part))
    sizes_tag = f"n{settings.n_train}-{settings.n_val}-{settings.n_test}-{zlib.crc32(prompts.encode()):08x}"
    path = CACHE / "states" / f"{data.short}_top{settings.n_top}_len{settings.max_length}_{sizes_tag}_s{settings.seed}.pt"
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    if path.exists():
        states = torch.load(path)
        if all(len(states[k]) == n for k, n in sizes.items()):
            return states
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    states = {k: split.bottom_states(getattr(data, k)) for k in sizes}
    torch.save(states, path)
    log(f"bottom states {data.short}: {sum(sizes.values())} examples in {time.perf_counter() - started:.0f}s")
    return states


def adapter_dir(kind: str, short: str, settings: Settings) -> Path:
    name = f"{kind}_r{settings.rank}_top{settings.n_top}_steps{settings.steps}_n{settings.n_train}_lr{settings.lr:g}"
    return CACHE / "adapters" / name / short


def stage_train(split, tasks, states, settings, results, kind: str = "lora", peft_wrap=None) -> dict[str, Path]:
    """One adapter per task (cached); records training time and fine-tuned test/val accuracy."""
    from .evaluate import adapter_deltas

    paths = {}
    for data in tasks:
        out = adapter_dir(kind, data.short, settings)
        if not (out / "adapter_model.safetensors").exists():
            log(f"training {kind} for {data.short}")
            info = train_lora(split, states[data.short]["train"], data.train, out, rank=settings.rank,
                              alpha=settings.alpha, steps=settings.steps, batch_size=settings.batch_size,
                              lr=settings.lr, seed=settings.seed, base_path=str(plain_model_dir()),
                              peft_wrap=peft_wrap(data) if peft_wrap else None)
            results.put("training", kind, data.short, value=info)
            log(f"  {info}")
        paths[data.short] = out
        if results.get("finetuned", kind, data.short, "adapter") != str(out):
            with split.patched(adapter_deltas(out)):
                acc = {k: split.accuracy(states[data.short][k], getattr(data, k)) for k in ("val", "test")}
            results.put("finetuned", kind, data.short, value={**acc, "adapter": str(out)})
            log(f"  fine-tuned {kind} {data.short}: {acc}")
    return paths


def top_layer_targets(split: SplitLM) -> str:
    """PEFT's regex form of the LoRA targets: the seven projections of the top layers only."""
    from .model import TARGETS

    layers = "|".join(str(i) for i in split.top_layers)
    return rf".*\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(TARGETS)})"


def osrm_wrap(split: SplitLM, tokenizer, tasks, settings: Settings, results: Results):
    """OSRM (loramerge.training.osrm, the paper's covariance form): each task's A = the directions of least input
    energy over the *other* tasks' prompts (unlabeled), computed on the base model; B = 0; A trained (the
    authors' default)."""
    from loramerge.training.osrm import compute_osrm_init, prepare_osrm_model

    def for_task(data):
        others = {d.short: [e.prompt for e in d.train[: settings.osrm_samples]] for d in tasks
                  if d.short != data.short}

        def wrap(model):
            t0 = time.perf_counter()
            init = compute_osrm_init(model, others, tokenizer=tokenizer, r=settings.rank,
                                     target_modules=top_layer_targets(split), max_samples=settings.osrm_samples,
                                     max_length=settings.max_length, batch_size=16)
            ratios = list(init.energy_ratio.values())
            results.put("osrm_init", data.short, value={
                "seconds": time.perf_counter() - t0, "modules": len(ratios), "tokens": init.tokens,
                "mean_energy_ratio": sum(ratios) / len(ratios), "max_energy_ratio": max(ratios)})
            return prepare_osrm_model(model, init, lora_alpha=settings.alpha, freeze_A=False)
        return wrap
    return for_task


def lori_wrap(split: SplitLM, tasks, settings: Settings):
    """LoRI-D (loramerge.training.lori): A drawn from a per-task seed and frozen, only B trained."""
    from loramerge.training.lori import LoriSpec, lori_model

    from .model import TARGETS

    def for_task(data):
        spec = LoriSpec(seed=1000 + [d.short for d in tasks].index(data.short), r=settings.rank,
                        lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=TARGETS)
        return lambda model: lori_model(model, spec, layers_to_transform=split.top_layers, task_type="CAUSAL_LM")
    return for_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=Settings.threads)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (orthogonal = osrm,lori)")
    parser.add_argument("--methods", default="", help="comma-separated registry names (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny splits and budgets, results in cache/smoke/ (checks every stage runs; no report)")
    args = parser.parse_args(argv)
    settings = Settings(threads=args.threads)
    results_path = RESULTS
    if args.smoke:
        settings = Settings(threads=args.threads, n_train=16, n_val=6, n_test=6, steps=4, gate_steps=3,
                            osrm_samples=4, random_seeds=(0, 1))
        results_path = CACHE / "smoke" / "results.json"
        results_path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    stages = set(args.stages.split(","))
    if "orthogonal" in stages:
        stages |= {"osrm", "lori"}
    results = Results(results_path)
    if stages == {"report"}:
        from .report import write_report

        print(write_report(results.data))
        return
    current = json.loads(json.dumps(settings.as_dict()))
    stored = results.get("settings")
    if stored is not None and {k: v for k, v in stored.items() if k != "threads"} != {
            k: v for k, v in current.items() if k != "threads"}:  # measured under other settings: keep them aside
        archive = results_path.with_name(f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")
        results_path.replace(archive)
        log(f"settings changed: earlier results moved to {archive.name}")
        results = Results(results_path)
    results.put("settings", value=current)
    results.put("machine", value={"platform": platform.platform(), "processor": platform.processor(),
                                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                  "load_average": " / ".join(f"{x:.2f}" for x in os.getloadavg())})
    runs = results.get("runs", default=[])
    timings: dict[str, float] = {}
    runs.append({"stages": args.stages, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "timings_s": timings})
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
            return timed(name, fn, *a, **kw)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports what failed and goes on
            results.put("failures", name, value=f"{type(exc).__name__}: {exc}")
            log(f"stage {name} FAILED: {exc}")
            return None

    model, tokenizer = timed("load_model", load_model_and_tokenizer)
    tasks = timed("load_tasks", load_task_data, n_train=settings.n_train, n_val=settings.n_val,
                  n_test=settings.n_test, seed=settings.seed)
    results.put("tasks", value={d.short: {"name": d.name, "options": d.n_options, "train": len(d.train),
                                          "val": len(d.val), "test": len(d.test)} for d in tasks})
    split = SplitLM(model, tokenizer, n_top=settings.n_top, max_length=settings.max_length)
    states = timed("bottom_states", lambda: {d.short: cached_states(split, d, settings) for d in tasks})
    if "base" in stages:
        def base():
            for d in tasks:
                if results.get("base", d.short) is None:
                    acc = {k: split.accuracy(states[d.short][k], getattr(d, k)) for k in ("val", "test")}
                    results.put("base", d.short, value=acc)
                    log(f"base {d.short}: {acc}")
        timed("base_eval", base)
    paths = {}
    if stages & {"train", "exact", "merge", "rmm", "twin", "routers", "tokens"}:
        paths = timed("train_lora", stage_train, split, tasks, states, settings, results)
    from . import evaluate

    if "exact" in stages:
        optional("exact", evaluate.stage_exact, paths, results)
    if "rmm" in stages:
        optional("rmm", evaluate.stage_rmm, split, tasks, states, paths, settings, results)
    if "twin" in stages:
        optional("twin", evaluate.stage_twin, split, tasks, states, paths, settings, results)
    if "routers" in stages:
        optional("routers", evaluate.stage_routers, split, tasks, states, paths, settings, results)
    if "tokens" in stages:
        optional("tokens", evaluate.stage_tokens, split, tasks, states, paths, settings, results)
    if "merge" in stages:
        timed("merge_sweep", evaluate.stage_merge, split, tasks, states, paths, settings, results,
              [m for m in args.methods.split(",") if m] or None)
    methods = [m for m in args.methods.split(",") if m] or None
    if "osrm" in stages:
        osrm_paths = timed("train_osrm", stage_train, split, tasks, states, settings, results, "osrm",
                           osrm_wrap(split, tokenizer, tasks, settings, results))
        optional("merge_sweep_osrm", evaluate.stage_merge, split, tasks, states, osrm_paths, settings, results,
                 methods, kind="osrm")
    if "lori" in stages:
        lori_paths = timed("train_lori", stage_train, split, tasks, states, settings, results, "lori",
                           lori_wrap(split, tasks, settings))
        optional("merge_sweep_lori", evaluate.stage_merge, split, tasks, states, lori_paths, settings, results,
                 methods, kind="lori")
    timings["total"] = round(time.perf_counter() - started, 1)
    if "report" in stages and not args.smoke:
        from .report import write_report

        write_report(results.data)
    timings["total"] = round(time.perf_counter() - started, 1)
    results.put("runs", value=runs)
    log(f"done in {timings['total']:.0f}s")


if __name__ == "__main__":
    main()
