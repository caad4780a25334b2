"""Evaluation of adapters as weight deltas: every registry merge method, RMM reconstructions, Twin bundles.

Selection protocol: each method's hyperparameters are chosen by mean normalized accuracy on the validation
split (a small grid); the test split is evaluated once, with the chosen point (random methods: 3 seeds)."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from loramerge.adapter import load_adapter
from loramerge.merge import merge as merge_fn
from loramerge.methods import REGISTRY

LAMBDA_GRID = (0.25, 0.5, 1.0, 2.0)
"""Scale grid for every method with a ``lambda`` (or LoRA-LEGO's ``gamma``); other parameters keep the
method's documented defaults (the paper's values), so the grid stays small enough for a CPU sweep."""

Deltas = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adapter_deltas(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    adapter = load_adapter(str(path))
    return {m: (f.B, f.A) for m in adapter.modules for f in [adapter.factors(m)]}


def module_deltas(modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m.name: (m.B, m.A) for m in modules}


def accuracies(split, tasks, states, deltas: Deltas, part: str, only: str | None = None) -> dict[str, float]:
    """Accuracy per task on ``part`` (val / test) with ``deltas`` added to the base weights."""
    with split.patched(deltas):
        return {d.short: split.accuracy(states[d.short][part], getattr(d, part))
                for d in tasks if only is None or d.short == only}


def normalized(acc: Mapping[str, float], finetuned: Mapping[str, dict], part: str) -> dict[str, float]:
    """merged / fine-tuned accuracy per task (the papers' normalized accuracy)."""
    return {t: a / max(finetuned[t][part], 1e-9) for t, a in acc.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def grid_for(method) -> list[dict]:
    fields = method.config_cls.model_fields
    if "lambda_" in fields:
        return [{"lambda": v} for v in LAMBDA_GRID]
    if "gamma" in fields and method.name == "lora_lego":
        return [{"gamma": v} for v in LAMBDA_GRID]
    return [{}]


def _same(a, b, rtol: float = 1e-4) -> bool:
    """Same merged deltas B @ A (the factors themselves may differ by the rank policy's randomized SVD)."""
    for x, y in zip(a.modules, b.modules):
        dx, dy = x.B @ x.A, y.B @ y.A
        if float((dx - dy).norm()) > rtol * max(float(dx.norm()), 1e-12):
            return False
    return True


FACTORWISE_SUFFIX = "+factorwise"
"""``task_arithmetic+factorwise``: the same method with the recipe's ``factorwise=True`` (A and B averaged
separately, the naive factor-wise baseline the published ordering puts last)."""


def run_variant(name: str, paths: list[str], params: dict, seed: int):
    """Merge with registry method ``name`` (``+factorwise`` suffix: the recipe's factorwise flag)."""
    flags = {"factorwise": True} if name.endswith(FACTORWISE_SUFFIX) else {}
    return merge_fn(adapters=paths, method=name.removesuffix(FACTORWISE_SUFFIX), parameters=params, seed=seed,
                    **flags)


def is_random(name: str, paths: list[str]) -> bool:
    """A method is random when seeds 0 and 1 give different deltas (checked, not declared)."""
    return not _same(run_variant(name, paths, {}, 0), run_variant(name, paths, {}, 1))


def stage_merge(split, tasks, states, paths: Mapping[str, Path], settings, results, methods=None,
                kind: str = "lora") -> None:
    """Every method on the ``kind`` adapters (plain LoRA, or LoRI); results under ``merge`` / ``merge_<kind>``."""
    finetuned = results.get("finetuned", kind)
    section = "merge" if kind == "lora" else f"merge_{kind}"
    names = [str(paths[d.short]) for d in tasks]
    for name in methods or [*REGISTRY, "task_arithmetic" + FACTORWISE_SUFFIX]:
        if name in (results.get(section) or {}) and "error" not in results.get(section, name):
            continue
        method = REGISTRY[name.removesuffix(FACTORWISE_SUFFIX)]
        log(f"merge sweep ({kind}): {name}")
        try:
            random = is_random(name, names)
            val_scores = {}
            for params in grid_for(method):
                result = run_variant(name, names, params, 0)
                acc = accuracies(split, tasks, states, module_deltas(result.modules), "val")
                val_scores[repr(params)] = (mean(normalized(acc, finetuned, "val").values()), params)
            best_key = max(val_scores, key=lambda k: val_scores[k][0])
            best = val_scores[best_key][1]
            runs = []
            for seed in settings.random_seeds if random else (0,):
                result = run_variant(name, names, best, seed)
                acc = accuracies(split, tasks, states, module_deltas(result.modules), "test")
                runs.append({"seed": seed, "acc": acc, "seconds": result.seconds,
                             "max_rank": max(r.rank for r in result.reports),
                             "mean_rank": mean(r.rank for r in result.reports),
                             "rel_error": result.max_rel_error})
            per_task = {t: mean(r["acc"][t] for r in runs) for t in runs[0]["acc"]}
            norm = normalized(per_task, finetuned, "test")
            record = {
                "kind": method.kind, "exact": method.exact, "random": random, "params": best,
                "val_grid": {k: v[0] for k, v in val_scores.items()}, "runs": runs, "acc": per_task,
                "normalized": norm, "avg_normalized": mean(norm.values()),
                "avg_normalized_std": statistics.pstdev(
                    [mean(normalized(r["acc"], finetuned, "test").values()) for r in runs]) if random else 0.0,
                "seconds": mean(r["seconds"] for r in runs), "max_rank": runs[0]["max_rank"],
                "mean_rank": runs[0]["mean_rank"],
            }
            results.put(section, name, value=record)
            log(f"  {name}: params {best} avg normalized {record['avg_normalized']:.3f} "
                f"(merge {record['seconds']:.2f}s, rank {record['max_rank']})")
        except Exception as exc:  # a failing method is a result to report, not a crash of the benchmark
            results.put(section, name, value={"error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name} FAILED: {exc}")


def stage_rmm(split, tasks, states, paths: Mapping[str, Path], settings, results) -> None:
    """RMM bases with k < N; each task is rebuilt from the basis and evaluated on its own test split."""
    from loramerge.basis import build_basis

    finetuned = results.get("finetuned", "lora")
    n = len(tasks)
    names = [d.short for d in tasks]
    for k, granularity in itertools.product((n - 1, n // 2, 2), ("module", "row")):
        key = f"k{k}_{granularity}"
        if results.get("rmm", key) is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            basis = build_basis([str(paths[t]) for t in names], k, Path(tmp) / "basis", granularity=granularity,
                                names=names)
            seconds = time.perf_counter() - t0
            acc = {}
            for d in tasks:
                acc.update(accuracies(split, tasks, states, module_deltas(basis.task_modules(d.short)), "test",
                                      only=d.short))
            errors = {t["name"]: t["rel_error"] for t in basis.manifest["tasks"]}
            storage = basis.manifest.get("storage", {}).get("storage_ratio")
        norm = normalized(acc, finetuned, "test")
        results.put("rmm", key, value={"k": k, "granularity": granularity, "acc": acc, "normalized": norm,
                                        "avg_normalized": mean(norm.values()), "min_normalized": min(norm.values()),
                                        "rel_error": errors, "storage_ratio": storage, "seconds": seconds})
        log(f"  rmm {key}: avg normalized {mean(norm.values()):.3f}, min {min(norm.values()):.3f}")


def stage_twin(split, tasks, states, paths: Mapping[str, Path], settings, results) -> None:
    """Twin-Merging bundles (shared task arithmetic + rank-r residuals) with oracle routing (the task's
    own residual at weight 1): the upper bound of any router over the bundle."""
    from loramerge.twin import build_twin, compose_twin

    finetuned = results.get("finetuned", "lora")
    names = [d.short for d in tasks]
    for shared_lambda, residual_rank in ((0.3, 8), (0.3, 4), (0.3, 2)):
        key = f"ta{shared_lambda}_r{residual_rank}"
        if results.get("twin", key) is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            bundle = build_twin([str(paths[t]) for t in names], Path(tmp) / "twin",
                                shared_parameters={"lambda": shared_lambda}, residual_rank=residual_rank, names=names)
            seconds = time.perf_counter() - t0
            acc, shared_only = {}, {}
            for d in tasks:
                acc.update(accuracies(split, tasks, states, module_deltas(compose_twin(bundle, {d.short: 1.0})),
                                      "test", only=d.short))
            shared_only = accuracies(split, tasks, states, module_deltas(compose_twin(bundle, {})), "test")
        norm = normalized(acc, finetuned, "test")
        shared_norm = normalized(shared_only, finetuned, "test")
        results.put("twin", key, value={"shared_lambda": shared_lambda, "residual_rank": residual_rank,
                                         "acc": acc, "normalized": norm, "avg_normalized": mean(norm.values()),
                                         "min_normalized": min(norm.values()), "shared_acc": shared_only,
                                         "shared_avg_normalized": mean(shared_norm.values()), "seconds": seconds})
        log(f"  twin {key}: oracle avg normalized {mean(norm.values()):.3f} (shared only "
            f"{mean(shared_norm.values()):.3f})")


def pooled(states) -> torch.Tensor:
    """Mean-pooled cached hidden states (the base model's own layer input below the LoRA layers)."""
    return torch.stack([s.mean(0) for s in states])


def routed_accuracy(split, tasks, states, routes: Mapping[str, list[str]], deltas_for) -> dict[str, float]:
    """Test accuracy per task when each example runs with the adapter its router picked (top-1):
    examples are grouped by the picked adapter, so each adapter is patched in once."""
    correct = {d.short: 0 for d in tasks}
    for chosen in {c for picks in routes.values() for c in picks}:
        with split.patched(deltas_for(chosen)):
            for d in tasks:
                idx = [i for i, c in enumerate(routes[d.short]) if c == chosen]
                if idx:
                    preds = split.predictions([states[d.short]["test"][i] for i in idx], [d.test[i] for i in idx])
                    correct[d.short] += int(sum(int(p) == d.test[i].answer for p, i in zip(preds, idx)))
    return {d.short: correct[d.short] / len(d.test) for d in tasks}


def stage_routers(split, tasks, states, paths: Mapping[str, Path], settings, results) -> None:
    """Request-level routers from `routers.request` fitted on the train split's pooled hidden states; routing
    accuracy on test, and the normalized accuracy of routed composition (plain LoRAs; Twin bundle)."""
    from loramerge.twin import build_twin, compose_twin
    from routers.request import CentroidRouter, ClassifierRouter, NearestNeighbourRouter

    finetuned = results.get("finetuned", "lora")
    names = [d.short for d in tasks]
    train = ([d.short for d in tasks for _ in d.train], torch.cat([pooled(states[d.short]["train"]) for d in tasks]))
    texts = [e.prompt for d in tasks for e in d.train]
    test_emb = {d.short: pooled(states[d.short]["test"]) for d in tasks}
    lora = {t: adapter_deltas(paths[t]) for t in names}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_twin([str(paths[t]) for t in names], Path(tmp) / "twin", shared_parameters={"lambda": 0.3},
                            residual_rank=8, names=names)
        twin = {t: module_deltas(compose_twin(bundle, {t: 1.0})) for t in names}
    fitters = {
        "centroid": lambda: CentroidRouter.fit((texts, train[0]), embeddings=train[1], adapter_names=names),
        "nearest_neighbour": lambda: NearestNeighbourRouter.fit((texts, train[0]), embeddings=train[1],
                                                                adapter_names=names),
        "classifier (Twin MLP)": lambda: ClassifierRouter.fit((texts, train[0]), embeddings=train[1],
                                                              adapter_names=names, seed=settings.seed),
    }
    for kind, fit in fitters.items():
        if results.get("routers", kind) is not None:
            continue
        t0 = time.perf_counter()
        router = fit()
        routes = {t: [names[i] for i in router.route_embeddings(test_emb[t]).argmax(-1).tolist()] for t in names}
        route_acc = {t: sum(r == t for r in routes[t]) / len(routes[t]) for t in names}
        record = {"routing_accuracy": route_acc, "avg_routing_accuracy": mean(route_acc.values()),
                  "fit_seconds": time.perf_counter() - t0}
        for target, deltas in (("lora", lora), ("twin_r8", twin)):
            acc = routed_accuracy(split, tasks, states, routes, deltas.__getitem__)
            norm = normalized(acc, finetuned, "test")
            record[target] = {"acc": acc, "normalized": norm, "avg_normalized": mean(norm.values())}
        results.put("routers", kind, value=record)
        log(f"  router {kind}: routing acc {record['avg_routing_accuracy']:.3f}, routed LoRA "
            f"{record['lora']['avg_normalized']:.3f}, routed Twin {record['twin_r8']['avg_normalized']:.3f}")


EXACT_REFERENCES = {
    "task_arithmetic": lambda n: 1.0,
    "cat": lambda n: 1.0,
    "average": lambda n: 1.0 / n,
}
"""Dense references for the exact methods at weight 1 per adapter: coefficient x sum_i B_i A_i."""


def stage_exact(paths: Mapping[str, Path], results) -> None:
    """Exact methods must reproduce their inputs exactly: the merged B @ A against the dense weighted sum of
    the task deltas (formed densely here, independently of loramerge's factored code), per module."""
    names = [str(p) for p in paths.values()]
    tasks = [adapter_deltas(p) for p in names]
    for method, coefficient in EXACT_REFERENCES.items():
        result = merge_fn(adapters=names, method=method, seed=0)
        worst = 0.0
        for module in result.modules:
            reference = coefficient(len(tasks)) * sum(B @ A for B, A in (t[module.name] for t in tasks))
            error = (module.B @ module.A - reference).norm() / reference.norm()
            worst = max(worst, float(error))
        results.put("exact", method, value={"max_rel_error": worst, "modules": len(result.modules),
                                            "rank": max(m.A.shape[0] for m in result.modules)})
        log(f"  exact {method}: max relative error {worst:.2e}")
