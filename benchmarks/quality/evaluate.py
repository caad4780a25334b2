"""Every registry merge method on the same adapters, and the exact methods' fidelity check.

Selection protocol: each method's hyperparameters are chosen by mean normalized accuracy on the validation
split (a small grid); the test split is evaluated once, at the chosen point (random methods: 3 seeds, the
per-example correctness averaged over the seeds)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from loramerge.merging.engine import merge as merge_fn
from loramerge.merging.methods import REGISTRY

from .bench import Bench, adapter_deltas, log, mean, module_deltas, normalized, seed_mean

LAMBDA_GRID = (0.3, 0.6)
"""Validation grid (``Settings.lambda_grid``) of the methods whose merged delta is a sum or a sparsified sum of
the six task deltas (task arithmetic, DARE, Breadcrumbs, magnitude pruning, STAR, KnOTS): six
all-layer adapters summed at weight 1 want a scale well below 1 (task arithmetic's usual optimum is 0.3-0.5)."""
ISOTROPIC_GRID = (0.6, 1.2)
"""Validation grid of the methods that flatten or orthogonalise the spectrum (TSV, Iso-C, Iso-CTS; LoRA-LEGO's
gamma): their best scale sits near or above 1 (v1 chose 0.5-2.0). Two points each: the cost of a full run
from scratch is dominated by evaluations (see ``project.py``); a third point costs 14 validation passes."""
ISOTROPIC = ("tsv", "iso_c", "iso_cts", "lora_lego")
DISJOINT_MEAN_GRID = (0.6, 1.0)
"""Validation grid of the sign-resolved methods with TIES's disjoint mean (TIES, DARE-TIES, DELLA): their merged
entry is a mean of the agreeing task entries, not a sum of six, so their scale sits near 1 (TIES's paper: 1).
Found on the v2 adapters: with the sum grid (0.3, 0.6) TIES chose 0.6, the grid's edge."""
DISJOINT_MEAN = ("ties", "dare_ties", "della")
REGMEAN_ALPHA_GRID = (0.5, 0.9)
"""RegMean's off-diagonal scale of each Gram (the paper's alpha; 0.9 its default)."""
DENSITY = 0.3
"""Density of the methods with a ``density`` (TIES, DARE, DELLA, Breadcrumbs, magnitude pruning, KnOTS),
fixed (v1's density grid cost as much as the rest of the sweep and chose 0.2 or 0.5 with 30 val examples)."""
ORTHOGONAL_METHODS = ("task_arithmetic", "ties", "tsv")
"""The methods run on the OSRM and LoRI adapters (plus the best data-free method on the plain LoRAs), at the
hyperparameters chosen for the plain LoRAs, with no validation pass: two more full sweeps would double the
run; the adapters themselves are trained exactly like the plain ones."""
EXACT_RANK_METHODS = ("ties", "dare_ties")
FACTORWISE_SUFFIX = "+factorwise"
EXACT_RANK_SUFFIX = "@exact"


def grid_for(method, grid: tuple[float, ...] = LAMBDA_GRID) -> list[dict]:
    fields = method.config_cls.model_fields
    if method.name in ISOTROPIC and len(grid) > 1:
        grid = ISOTROPIC_GRID
    if method.name in DISJOINT_MEAN and len(grid) > 1:
        grid = DISJOINT_MEAN_GRID
    if method.name == "regmean" and "alpha" in fields and len(grid) > 1:
        return [{"alpha": a} for a in REGMEAN_ALPHA_GRID]
    extra = {"density": DENSITY} if "density" in fields else {}
    if "lambda_" in fields:
        return [{"lambda": v, **extra} for v in grid]
    if "gamma" in fields and method.name == "lora_lego":
        return [{"gamma": v} for v in grid]
    return [extra]


def parse_variant(name: str) -> tuple[str, dict]:
    """Registry name and recipe flags of a variant label (``+factorwise``, ``@exact`` suffixes)."""
    flags: dict = {}
    if name.endswith(EXACT_RANK_SUFFIX):
        name, flags["rank"] = name.removesuffix(EXACT_RANK_SUFFIX), "exact"
    if name.endswith(FACTORWISE_SUFFIX):
        name, flags["factorwise"] = name.removesuffix(FACTORWISE_SUFFIX), True
    return name, flags


def run_variant(name: str, paths: list[str], params: dict, seed: int, **extra):
    method, flags = parse_variant(name)
    return merge_fn(adapters=paths, method=method, parameters=params, seed=seed, **flags, **extra)


def _same(a, b, rtol: float = 0.05) -> bool:
    """Same merged deltas B @ A up to ``rtol`` of their norm. 5% ignores the randomized SVD of the rank policy
    (seed-dependent at round-off level of the kept subspace) and catches random drops (DARE: ~100%)."""
    for x, y in zip(a.modules, b.modules):
        dx, dy = x.B @ x.A, y.B @ y.A
        if float((dx - dy).norm()) > rtol * max(float(dx.norm()), 1e-12):
            return False
    return True


def is_random(bench: Bench, name: str, paths: list[str]) -> bool:
    """A method is random when seeds 0 and 1 give deltas more than 5% apart (checked once, not declared)."""
    known = bench.results.get("random_methods", name)
    if known is None:
        known = not _same(run_variant(name, paths, {}, 0), run_variant(name, paths, {}, 1))
        bench.results.put("random_methods", name, value=known)
    return known


def default_variants() -> list[str]:
    """The data-free registry methods (registry ``data`` "none"; the others run in data_methods.py)."""
    free = [name for name, m in REGISTRY.items() if getattr(m, "data", "none") == "none"]
    return [*free, "task_arithmetic" + FACTORWISE_SUFFIX]


def test_record(bench: Bench, merge_once, params: dict, random: bool, finetuned) -> dict:
    """Test correctness of ``merge_once(params, seed)`` (mean over the seeds when random)."""
    runs, infos = [], []
    for seed in bench.settings.random_seeds if random else (0,):
        result = merge_once(params, seed)
        runs.append(bench.correct(module_deltas(result.modules), "test"))
        infos.append({"seconds": result.seconds, "max_rank": max(r.rank for r in result.reports),
                      "rel_error": result.max_rel_error})
    correct = seed_mean(runs)
    norm = normalized(correct, finetuned)
    per_seed = [mean(normalized(r, finetuned).values()) for r in runs]
    return {"random": random, "params": params, "seeds": len(runs), "correct": correct, "normalized": norm,
            "avg_normalized": mean(norm.values()), "avg_normalized_std": statistics.pstdev(per_seed),
            "seconds": mean(i["seconds"] for i in infos), "max_rank": infos[0]["max_rank"],
            "rel_error": infos[0]["rel_error"]}


def choose_and_test(bench: Bench, merge_once, grid: list[dict], random: bool, kind: str) -> dict:
    """Pick ``grid``'s best point on validation (seed 0), then ``test_record`` at it."""
    ft_val, ft_test = bench.finetuned(kind, "val"), bench.finetuned(kind, "test")
    if len(grid) == 1:  # nothing to choose: no validation pass
        return {"val_grid": {}, **test_record(bench, merge_once, grid[0], random, ft_test)}
    scores = {}
    for params in grid:
        correct = bench.correct(module_deltas(merge_once(params, 0).modules), "val")
        scores[repr(params)] = (mean(normalized(correct, ft_val).values()), params)
    best = scores[max(scores, key=lambda k: scores[k][0])][1]
    return {"val_grid": {k: v[0] for k, v in scores.items()},
            **test_record(bench, merge_once, best, random, ft_test)}


def stage_merge(bench: Bench, paths: Mapping[str, Path], methods=None, kind: str = "lora") -> None:
    """Every method on the ``kind`` adapters; results under ``merge`` / ``merge_<kind>``. The plain LoRAs get
    the validation grid and the ``@exact`` variants; OSRM and LoRI reuse the plain LoRAs' chosen points."""
    section = "merge" if kind == "lora" else f"merge_{kind}"
    names = [str(paths[t]) for t in bench.names]
    full = kind == "lora"
    if methods:
        todo = list(methods)
    elif full:
        todo = default_variants()
    else:
        plain = [(k, v) for k, v in (bench.results.get("merge") or {}).items() if "avg_normalized" in v]
        best = [max(plain, key=lambda kv: kv[1]["avg_normalized"])[0]] if plain else []
        todo = list(dict.fromkeys([*ORTHOGONAL_METHODS, *[b for b in best if b in REGISTRY]]))
    for name in todo:
        done = bench.results.get(section, name)
        if done is not None and "error" not in done:
            continue
        method = REGISTRY.get(parse_variant(name)[0])
        if method is None:
            continue
        log(f"merge sweep ({kind}): {name}")
        try:
            random = is_random(bench, name, names)
            if full:
                grid = grid_for(method, bench.settings.lambda_grid)
            else:
                chosen = bench.results.get("merge", name)
                grid = [chosen["params"]] if chosen and "params" in chosen else grid_for(method, bench.settings.lambda_grid)[:1]
            record = {"kind": method.kind, "exact": method.exact and not parse_variant(name)[1],
                      **choose_and_test(bench, lambda p, s, _n=name: run_variant(_n, names, p, s), grid, random, kind)}
            bench.results.put(section, name, value=record)
            log(f"  {name}: params {record['params']} avg normalized {record['avg_normalized']:.3f}")
        except Exception as exc:  # a failing method is a result to report, not a crash of the benchmark
            bench.results.put(section, name, value={"error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name} FAILED: {exc}")
    if not full:
        return
    for base in EXACT_RANK_METHODS:
        name = base + EXACT_RANK_SUFFIX
        chosen = bench.results.get(section, base)
        if chosen is None or "error" in chosen or name in bench.results.get(section):
            continue
        record = {"kind": "elementwise", "exact": False, "val_grid": {"reused from": base},
                  **test_record(bench, lambda p, s, _n=name: run_variant(_n, names, p, s), chosen["params"],
                                chosen["random"], bench.finetuned(kind, "test"))}
        bench.results.put(section, name, value=record)
        log(f"  {name}: avg normalized {record['avg_normalized']:.3f} (rank {record['max_rank']})")


EXACT_REFERENCES = {"task_arithmetic": lambda n: 1.0, "cat": lambda n: 1.0, "average": lambda n: 1.0 / n}
"""Dense references for the exact methods at weight 1 per adapter: coefficient x sum_i B_i A_i."""


def stage_exact(bench: Bench, paths: Mapping[str, Path]) -> None:
    """Exact methods must reproduce their inputs: the merged B @ A against the dense weighted sum of the task
    deltas (formed densely here, independently of loramerge's factored code), per module."""
    names = [str(p) for p in paths.values()]
    tasks = [adapter_deltas(p) for p in names]
    for method, coefficient in EXACT_REFERENCES.items():
        result = merge_fn(adapters=names, method=method, seed=0)
        worst = 0.0
        for module in result.modules:
            reference = coefficient(len(tasks)) * sum(B @ A for B, A in (t[module.name] for t in tasks))
            worst = max(worst, float((module.B @ module.A - reference).norm() / reference.norm()))
        bench.results.put("exact", method, value={"max_rel_error": worst, "modules": len(result.modules),
                                                  "rank": max(m.A.shape[0] for m in result.modules)})
        log(f"  exact {method}: max relative error {worst:.2e}")
