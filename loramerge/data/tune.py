"""``loramerge tune``: search merge method x parameters x per-adapter weights on validation data.

The objective is the mean over tasks of (merged score / the task's own adapter's score) on each task's
validation examples (accuracy by option log-likelihood, or ``exp(-LM loss)``): every task weighs the
same whatever its difficulty. Candidates are merged by the engine (factored, so a merge is cheap) and
scored with their deltas added to the base weights; every trial is scored on a small fixed slice of each
task, and the best few are re-scored on the whole validation set. Only the validation files given are
read: a test split never reaches the tuner.

The optimiser is Optuna: TPE by default, because it handles the categorical method choice and the
parameters that exist only for some methods (density for TIES, none for AdaMerging); CMA-ES (optional)
models continuous parameters only, so Optuna samples the method for it at random. The study lives in an
SQLite file and every score in a content-keyed cache, so an interrupted search resumes where it stopped
and a configuration already scored is never scored again.

Methods that need more than the adapters (registry field ``data`` other than "none") take part through
a *preparer* (``loramerge.data.search``), run once and cached, whose result (calibration statistics for
RegMean and Fisher, AdaMerging's learned coefficients) fills the method's recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.data.examples import Examples, fingerprint, read_examples
from loramerge.data.scoring import ValidationTask, patched
from loramerge.data.search import (
    DEFAULT_METHODS,
    POST_RANGES,
    PrepareContext,
    Preparer,
    SearchSpace,
    check_budget,
    check_space,
    default_preparers,
)
from loramerge.errors import NumericalError, OutputError, RecipeError
from loramerge.merging.methods import get_method

log = logging.getLogger("loramerge.data.tune")

@dataclass
class Trial:
    number: int
    config: dict
    score: float
    per_task: dict[str, float]
    seconds: float
    cached: bool
    full_score: float | None = None
    full_per_task: dict[str, float] | None = None


@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial
    baseline: Trial
    own_scores: dict[str, dict[str, float]]
    settings: dict[str, Any]
    evaluated: int = 0
    """Evaluations (slice or full) computed in this run, not read from the cache."""
    merged: Any = None
    """The best configuration's MergeResult (in memory)."""
    outputs: dict[str, Path] = field(default_factory=dict)


def canonical(config: Mapping[str, Any]) -> str:
    """A stable text for a configuration (floats rounded to 6 digits) to key the score cache."""
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in sorted(value.items())}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(dict(config)), sort_keys=True)


def _sha(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def default_config(names: Sequence[str], space: SearchSpace | None = None) -> dict:
    """Task arithmetic with lambda 1 and weight 1 for every adapter: the merge a user gets by default."""
    return {"method": "task_arithmetic", "parameters": {"lambda": 1.0}, "weights": [1.0] * len(names)}


class ScoreCache:
    """Append-only JSONL of scored configurations: key -> per-task raw scores."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by an interruption: that configuration is scored again

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, row: dict) -> None:
        row = {"key": key, **row}
        self.entries[key] = row
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_validation(source: Any, names: Sequence[str]) -> Examples:
    """The validation examples per adapter name, through the shared reader (tasks must match the adapters)."""
    return read_examples(source, tasks=list(names))


def _slice_index(n: int, size: int, seed: int, task: str) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-{task}").shuffle(order)
    return sorted(order[: min(size, n)])


class Tuner:
    """One tuning session over fixed adapters and validation data (see the module docstring)."""

    def __init__(self, model, tokenizer, adapters: Sequence[str | Path], names: Sequence[str], data: Examples, *,
                 cache_dir: Path, space: SearchSpace = SearchSpace(), slice_size: int = 32, top_k: int = 3,
                 seed: int = 0, preparers: Mapping[str, Preparer] | None = None, batch_size: int = 16,
                 max_length: int | None = None, base_id: str = "", show_progress: bool = True):
        from loramerge.core.adapter import load_adapter

        self.model, self.tokenizer = model, tokenizer
        self.paths = [Path(p) for p in adapters]
        self.names = list(names)
        self.space, self.seed, self.top_k, self.batch_size = space, seed, top_k, batch_size
        self.preparers = {**default_preparers(space.methods), **(preparers or {})}
        self.show_progress = show_progress
        self.cache_dir = Path(cache_dir)
        self.adapters = [load_adapter(p, name=n) for p, n in zip(self.paths, self.names, strict=True)]
        self.data = data
        self.tasks = [ValidationTask.from_examples(n, data[n]) for n in self.names]
        self.full = [t.encode(tokenizer, max_length) for t in self.tasks]
        self.slice = [e.select(_slice_index(len(e), slice_size, seed, e.task.name)) for e in self.full]
        self.context = _sha(base_id, *(a.sha256 for a in self.adapters), *self.names, fingerprint(data),
                            str(slice_size), str(seed), str(max_length))
        self.cache = ScoreCache(self.cache_dir / "scores.jsonl")
        self.evaluated = 0
        self.computed: list[tuple[str, str]] = []
        """(part, configuration) of every evaluation computed in this session (not read from the cache)."""
        self.prepared: dict[str, dict] = {}
        self.settings = {"slice_size": slice_size, "top_k": top_k, "seed": seed, "methods": list(space.methods),
                         "weights": space.weights, "weight_range": list(space.weight_range), "rank": space.rank,
                         "post": space.post,
                         "adapters": [str(p) for p in self.paths], "names": self.names,
                         "validation_sizes": {t.name: len(t) for t in self.tasks}}

    # -- scoring ------------------------------------------------------------------------------------------------

    def _raw_scores(self, factors, part: str) -> dict[str, float]:
        import torch

        encoded = self.slice if part == "slice" else self.full
        with patched(self.model, factors), torch.no_grad():
            return {e.task.name: e.score(self.model, batch_size=self.batch_size) for e in encoded}

    def own_scores(self, part: str) -> dict[str, float]:
        """Each task's own adapter's score on its own task (cached)."""
        out = {}
        for adapter, encoded in zip(self.adapters, self.slice if part == "slice" else self.full):
            key = _sha(self.context, "own", adapter.sha256, part)
            hit = self.cache.get(key)
            if hit is None:
                import torch

                factors = {m: adapter.factors(m) for m in adapter.modules}
                with patched(self.model, factors), torch.no_grad():
                    score = encoded.score(self.model, batch_size=self.batch_size)
                hit = {"score": score}
                self.cache.put(key, hit)
            out[encoded.task.name] = float(hit["score"])
        return out

    def normalized(self, raw: Mapping[str, float], part: str) -> dict[str, float]:
        own = self.own_scores(part)
        out = {}
        for task, value in raw.items():
            if own[task] <= 0:
                log.warning("task '%s': its own adapter scores 0 on the %s; using the raw score", task, part)
                out[task] = value
            else:
                out[task] = value / own[task]
        return out

    def recipe(self, config: Mapping[str, Any]):
        from loramerge.merging.recipe import parse_recipe

        weights = config.get("weights") or [1.0] * len(self.names)
        return parse_recipe({
            "method": config["method"], "parameters": dict(config.get("parameters", {})),
            "adapters": [{"path": str(p), "name": n, "weight": float(w)}
                         for p, n, w in zip(self.paths, self.names, weights, strict=True)],
            "rank": self.space.rank, "seed": self.seed,
            **{k: config[k] for k in ("post", "calibration", "base_model") if config.get(k) is not None},
        })

    def merge(self, config: Mapping[str, Any]):
        from loramerge.merging.engine import run_merge

        return run_merge(self.recipe(config), adapters=self.adapters, show_progress=False)

    def evaluate(self, config: Mapping[str, Any], part: str = "slice") -> tuple[float, dict[str, float], float, bool]:
        """(mean normalized score, per task, seconds, cached) of one configuration on the slice or the full set."""
        key = _sha(self.context, part, canonical(self._resolved(config)))
        hit = self.cache.get(key)
        if hit is None:
            started = time.perf_counter()
            raw = self._raw_scores(self.merge(self._resolved(config)).factors(), part)
            hit = {"raw": raw, "seconds": time.perf_counter() - started, "config": config}
            self.cache.put(key, hit)
            self.evaluated += 1
            self.computed.append((part, canonical(config)))
            cached = False
        else:
            cached = True
        per_task = self.normalized(hit["raw"], part)
        return sum(per_task.values()) / len(per_task), per_task, float(hit["seconds"]), cached

    def _resolved(self, config: Mapping[str, Any]) -> dict:
        """The config with a data method's prepared recipe fields filled in (what is merged and cached)."""
        method = get_method(config["method"]).name
        if method not in self.preparers:
            return dict(config)
        prepared = self._prepare(method)
        params = {**prepared.get("parameters", {}), **config.get("parameters", {})}
        return {**config, **{k: v for k, v in prepared.items() if k != "parameters"}, "parameters": params}

    def _prepare(self, method: str) -> dict:
        if method not in self.prepared:
            key = _sha(self.context, str(getattr(self.preparers[method], "key", "")))
            path = self.cache_dir / f"prepared-{method}-{key[:16]}.json"
            if path.is_file():
                self.prepared[method] = json.loads(path.read_text())
            else:
                log.info("preparing %s (once; cached in %s)", method, path)
                ctx = PrepareContext(self.model, self.tokenizer, self.paths, self.names, self.tasks, self.data,
                                     self.cache_dir, self.seed, self.show_progress)
                params = self.preparers[method](ctx)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(params))
                tmp.replace(path)
                self.prepared[method] = params
        return self.prepared[method]

    # -- search -------------------------------------------------------------------------------------------------

    def suggest(self, trial) -> dict:
        """One configuration from an Optuna trial (parameters conditional on the method)."""
        method = trial.suggest_categorical("method", list(self.space.methods))
        params = {k: trial.suggest_float(f"{method}.{k}", *r) for k, r in self.space.knobs(method).items()}
        config: dict[str, Any] = {"method": method, "parameters": params}
        if self.space.post and trial.suggest_categorical("post", ["none", "lines"]) == "lines":
            config["post"] = {"lines": {k: trial.suggest_float(f"post.lines.{k}", *r) for k, r in POST_RANGES.items()}}
        if self.space.weights and method not in self.preparers:
            config["weights"] = [trial.suggest_float(f"w.{n}", *self.space.weight_range) for n in self.names]
        else:
            config["weights"] = [1.0] * len(self.names)
        return config

    def study(self, storage: str, sampler: str):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=self.seed),
                    "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=self.seed, warn_independent_sampling=False),
                    "random": lambda: optuna.samplers.RandomSampler(seed=self.seed)}
        space_key = _sha(self.context, json.dumps(self.settings, sort_keys=True), sampler)[:16]
        study = optuna.create_study(storage=storage, study_name=f"tune-{space_key}", direction="maximize",
                                    sampler=samplers[sampler](), load_if_exists=True)
        if not study.trials and "task_arithmetic" in self.space.methods:
            params: dict[str, Any] = {"method": "task_arithmetic", "task_arithmetic.lambda": 1.0}
            if self.space.weights:
                params.update({f"w.{n}": 1.0 for n in self.names})
            study.enqueue_trial(params)  # the default merge is the first trial: the search starts from it
        return study

    def run(self, *, trials: int | None = None, minutes: float | None = None, sampler: str = "tpe",
            on_trial: Callable[[Trial], None] | None = None) -> TuneResult:
        check_budget(trials, minutes)
        optuna = _optuna()
        if sampler not in ("tpe", "cmaes", "random"):
            raise RecipeError(f"unknown sampler '{sampler}'", fix="use tpe, cmaes or random")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        study = self.study(f"sqlite:///{self.cache_dir / 'study.db'}", sampler)
        done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
        remaining = None if trials is None or trials <= 0 else max(trials - done, 0)
        bar = _TrialProgress(remaining, self.show_progress)

        def objective(trial) -> float:
            config = self.suggest(trial)
            score, per_task, seconds, cached = self.evaluate(config)
            trial.set_user_attr("config", config)
            trial.set_user_attr("per_task", per_task)
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("cached", cached)
            record = Trial(trial.number, config, score, per_task, seconds, cached)
            bar.advance(record)
            if on_trial is not None:
                on_trial(record)
            return score

        if remaining is None or remaining > 0:
            with bar:
                study.optimize(objective, n_trials=remaining, timeout=minutes * 60 if minutes else None,
                               catch=(RecipeError, NumericalError))
        return self.finish(study)

    def finish(self, study) -> TuneResult:
        import optuna

        records = [Trial(t.number, t.user_attrs["config"], float(t.value), t.user_attrs["per_task"],
                         t.user_attrs["seconds"], t.user_attrs["cached"])
                   for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not records:
            raise RecipeError("no trial completed", fix="raise the budget, or check the methods' errors above")
        default = default_config(self.names, self.space)
        baseline = Trial(-1, default, *self.evaluate(default, "slice"))
        contenders: dict[str, Trial] = {}
        for t in sorted(records, key=lambda t: -t.score):
            contenders.setdefault(canonical(t.config), t)
            if len(contenders) >= self.top_k:
                break
        for t in [*contenders.values(), baseline]:
            t.full_score, t.full_per_task, _, _ = self.evaluate(t.config, "full")
        best = max([*contenders.values(), baseline], key=lambda t: t.full_score or -math.inf)
        own = {"slice": self.own_scores("slice"), "full": self.own_scores("full")}
        return TuneResult(records, best, baseline, own, self.settings, evaluated=self.evaluated)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RecipeError("`loramerge tune` needs optuna", fix="pip install 'loramerge[tune]'") from None
    return optuna


class _TrialProgress:
    """A rich progress line over trials: count, best score so far, last configuration."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled, self.best = total, enabled, -math.inf
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("tuning", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def advance(self, trial: Trial) -> None:
        self.best = max(self.best, trial.score)
        line = (f"trial {trial.number}: {trial.config['method']} score {trial.score:.3f}"
                f"{' (cached)' if trial.cached else ''}; best {self.best:.3f}")
        log.info(line)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=f"tuning (best {self.best:.3f})")


def load_causal_lm(base: str | Path):
    """The base model (float32, eval mode) and its tokenizer: the calibration's loader."""
    from loramerge.data.calibration import load_base_model

    return load_base_model(base)


def base_model_of(adapters: Sequence[Path]) -> str:
    """The base model the adapters name (they must agree)."""
    from loramerge.core.adapter import load_adapter

    bases = {load_adapter(p).base_model for p in adapters} - {None}
    if len(bases) != 1:
        raise RecipeError(f"the adapters name {len(bases)} base models ({sorted(map(str, bases))})",
                          fix="pass --base with the base model directory or hub id")
    return str(bases.pop())


def check_output(output: Path, force: bool) -> None:
    """Refuse to overwrite a finished tune; allow resuming an interrupted one (a cache and nothing else)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError("the output path exists and is a file", path=str(output), fix="choose a directory")
    if output.is_dir() and not force:
        entries = {p.name for p in output.iterdir()}
        if entries - {"cache"}:
            raise OutputError("the output directory holds a finished tune (or other files)", path=str(output),
                              fix="choose a new --output, or pass --force to replace the results "
                              "(the cache is kept, so scored configurations are not scored again)")


__all__ = ["DEFAULT_METHODS", "PrepareContext", "Preparer", "SearchSpace", "Trial", "TuneResult", "Tuner",
           "base_model_of", "canonical", "check_budget", "check_output", "check_space", "default_config",
           "default_preparers", "load_causal_lm", "read_validation"]
