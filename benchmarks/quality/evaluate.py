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

from loramerge.core.adapter import load_adapter
from loramerge.merging.engine import merge as merge_fn
from loramerge.merging.methods import REGISTRY

LAMBDA_GRID = (0.25, 0.5, 1.0, 2.0)
"""Scale grid for every method with a ``lambda`` (or LoRA-LEGO's ``gamma``)."""
DENSITY_GRID = (0.2, 0.5)
"""Density grid for the methods with a ``density`` (TIES, DARE, DELLA, Breadcrumbs, magnitude pruning, KnOTS),
crossed with ``DENSE_LAMBDA_GRID`` on the plain LoRAs; other parameters keep the method's documented defaults."""
DENSE_LAMBDA_GRID = (0.5, 1.0, 2.0)
EXACT_RANK_METHODS = ("ties", "dare_ties")
"""Element-wise methods also evaluated with ``rank: exact`` (the dense result stored losslessly) at the
hyperparameters chosen for the default ``rank: auto``: what the default rank policy costs in accuracy."""

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


def grid_for(method, with_density: bool = True) -> list[dict]:
    fields = method.config_cls.model_fields
    if "lambda_" in fields:
        scales = [{"lambda": v} for v in LAMBDA_GRID]
    elif "gamma" in fields and method.name == "lora_lego":
        scales = [{"gamma": v} for v in LAMBDA_GRID]
    else:
        scales = [{}]
    if with_density and "density" in fields:
        return [{"lambda": v, "density": d} for v in DENSE_LAMBDA_GRID for d in DENSITY_GRID]
    return scales


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
EXACT_RANK_SUFFIX = "@exact"
"""``ties@exact``: the method with ``rank: exact`` instead of the default ``rank: auto``."""


def parse_variant(name: str) -> tuple[str, dict]:
    """Registry name and recipe flags of a variant label (``+factorwise``, ``@exact`` suffixes)."""
    flags: dict = {}
    if name.endswith(EXACT_RANK_SUFFIX):
        name, flags["rank"] = name.removesuffix(EXACT_RANK_SUFFIX), "exact"
    if name.endswith(FACTORWISE_SUFFIX):
        name, flags["factorwise"] = name.removesuffix(FACTORWISE_SUFFIX), True
    return name, flags


def run_variant(name: str, paths: list[str], params: dict, seed: int):
    """Merge with registry method ``name`` (suffixes: the recipe flags of ``parse_variant``)."""
    method, flags = parse_variant(name)
    return merge_fn(adapters=paths, method=method, parameters=params, seed=seed, **flags)


def is_random(name: str, paths: list[str], results) -> bool:
    """A method is random when seeds 0 and 1 give different deltas (checked once, not declared)."""
    known = results.get("random_methods", name)
    if known is None:
        known = not _same(run_variant(name, paths, {}, 0), run_variant(name, paths, {}, 1))
        results.put("random_methods", name, value=known)
    return known


def default_variants() -> list[str]:
    return [*REGISTRY, "task_arithmetic" + FACTORWISE_SUFFIX]


def test_record(name: str, names: list[str], params: dict, random: bool, split, tasks, states, settings,
                finetuned) -> dict:
    """Test accuracy of one variant at ``params`` (mean over the seeds when the method is random)."""
    runs = []
    for seed in settings.random_seeds if random else (0,):
        result = run_variant(name, names, params, seed)
        acc = accuracies(split, tasks, states, module_deltas(result.modules), "test")
        runs.append({"seed": seed, "acc": acc, "seconds": result.seconds,
                     "max_rank": max(r.rank for r in result.reports),
                     "mean_rank": mean(r.rank for r in result.reports),
                     "rel_error": result.max_rel_error})
    per_task = {t: mean(r["acc"][t] for r in runs) for t in runs[0]["acc"]}
    norm = normalized(per_task, finetuned, "test")
    return {
        "random": random, "params": params, "runs": runs, "acc": per_task, "normalized": norm,
        "avg_normalized": mean(norm.values()),
        "avg_normalized_std": statistics.pstdev(
            [mean(normalized(r["acc"], finetuned, "test").values()) for r in runs]) if random else 0.0,
        "seconds": mean(r["seconds"] for r in runs), "max_rank": runs[0]["max_rank"],
        "mean_rank": runs[0]["mean_rank"],
    }


def stage_merge(split, tasks, states, paths: Mapping[str, Path], settings, results, methods=None,
                kind: str = "lora") -> None:
    """Every method on the ``kind`` adapters (plain LoRA, LoRI, OSRM); results under ``merge`` /
    ``merge_<kind>``. The plain LoRAs get the full grid (scale x density) and the ``@exact`` variants; the
    orthogonal kinds the scale grid (the sweep has to fit the CPU budget)."""
    finetuned = results.get("finetuned", kind)
    section = "merge" if kind == "lora" else f"merge_{kind}"
    names = [str(paths[d.short]) for d in tasks]
    full = kind == "lora"
    for name in methods or default_variants():
        if name in (results.get(section) or {}) and "error" not in results.get(section, name):
            continue
        method = REGISTRY[parse_variant(name)[0]]
        log(f"merge sweep ({kind}): {name}")
        try:
            random = is_random(name, names, results)
            val_scores = {}
            for params in grid_for(method, with_density=full):
                result = run_variant(name, names, params, 0)
                acc = accuracies(split, tasks, states, module_deltas(result.modules), "val")
                val_scores[repr(params)] = (mean(normalized(acc, finetuned, "val").values()), params)
            best = val_scores[max(val_scores, key=lambda k: val_scores[k][0])][1]
            record = {"kind": method.kind, "exact": method.exact and not parse_variant(name)[1],
                      "val_grid": {k: v[0] for k, v in val_scores.items()},
                      **test_record(name, names, best, random, split, tasks, states, settings, finetuned)}
            results.put(section, name, value=record)
            log(f"  {name}: params {best} avg normalized {record['avg_normalized']:.3f} "
                f"(merge {record['seconds']:.2f}s, rank {record['max_rank']})")
        except Exception as exc:  # a failing method is a result to report, not a crash of the benchmark
            results.put(section, name, value={"error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name} FAILED: {exc}")
    if not full:
        return
    for base in EXACT_RANK_METHODS:
        name = base + EXACT_RANK_SUFFIX
        chosen = results.get(section, base)
        if chosen is None or "error" in chosen or name in results.get(section):
            continue
        log(f"merge sweep ({kind}): {name} at {base}'s chosen {chosen['params']}")
        record = {"kind": "elementwise", "exact": False, "val_grid": {"reused from": base},
                  **test_record(name, names, chosen["params"], chosen["random"], split, tasks, states, settings,
                                finetuned)}
        results.put(section, name, value=record)
        log(f"  {name}: avg normalized {record['avg_normalized']:.3f} (rank {record['max_rank']})")


def stage_rmm(split, tasks, states, paths: Mapping[str, Path], settings, results) -> None:
    """RMM bases with k < N; each task is rebuilt from the basis and evaluated on its own test split."""
    from loramerge.artifacts.basis import build_basis

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
    from loramerge.artifacts.twin import build_twin, compose_twin

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
    from loramerge.artifacts.twin import build_twin, compose_twin
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


def gated_letter_logits(split, states, gates, routed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer-letter logits of cached ``states`` through the top layers with per-token ``gates`` installed, and
    each example's adapter mass (the gates' output averaged over its tokens and the gated layers)."""
    from routers.moe import adapter_mass, recorded_gates

    from .model import _pad

    batch, mask, last = _pad(states)
    with recorded_gates(gates) as store:
        hidden = split.top(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
    logits = hidden[torch.arange(len(states)), last] @ split.model.lm_head.weight[split.letter_ids].T
    return logits, adapter_mass(store, mask, routed)


def gated_predictions(split, states, gates, routed: list[int], batch_size: int = 32):
    """``gated_letter_logits`` over all of ``states``, batch by batch, without gradients."""
    with torch.no_grad():
        parts = [gated_letter_logits(split, states[lo: lo + batch_size], gates, routed)
                 for lo in range(0, len(states), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_token_gates(split, controller, tasks, states, settings, route_loss_weight: float = 0.0) -> dict:
    """Train the controller's installed gates on the union of the tasks' training splits: the answer letter's
    cross-entropy (plus ``route_loss_weight`` x the task-label NLL of the token-averaged gate mass), every
    other parameter frozen, every adapter at weight 1 (the gates decide: ``routers.moe``'s training context)."""
    import torch.nn.functional as F

    from routers.moe import _gates_in_training

    pool = [(s, e.answer, i) for i, d in enumerate(tasks) for s, e in zip(states[d.short]["train"], d.train)]
    gates = controller.gates()
    generator = torch.Generator().manual_seed(settings.seed)
    routed = list(range(len(tasks)))
    losses, started = [], time.perf_counter()
    with _gates_in_training(controller, gates) as params:
        optimizer = torch.optim.Adam(params, lr=settings.gate_lr)
        for _ in range(settings.gate_steps):
            idx = torch.randint(len(pool), (16,), generator=generator).tolist()
            logits, mass = gated_letter_logits(split, [pool[i][0] for i in idx], gates, routed)
            loss = F.cross_entropy(logits, torch.tensor([pool[i][1] for i in idx]))
            if route_loss_weight:
                labels = torch.tensor([pool[i][2] for i in idx])
                loss = loss + route_loss_weight * F.nll_loss(torch.log(mass.clamp_min(1e-9)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return {"steps": settings.gate_steps, "seconds": time.perf_counter() - started,
            "loss_first10": mean(losses[:10]), "loss_last10": mean(losses[-10:])}


def stage_tokens(split, tasks, states, paths: Mapping[str, Path], settings, results) -> None:
    """Per-token routing over the 6 LoRAs attached as gated layers (routers.gated) to the top layers: Arrow
    (data-free, top-1 and PEFT's top-3), X-LoRA-style softmax gates on each layer's input and CoMoL-style
    core-space gates (both trained with the answer loss on the union of the training splits, LoRAs frozen),
    and softmax gates trained with an added task-label routing loss. Routing accuracy: the argmax of the gate
    mass averaged over a prompt's tokens and the gated layers, against the example's task."""
    from routers.gated import attach_gated_lora
    from routers.moe import attach_core_space, softmax_gates
    from routers.request import ArrowRouter

    finetuned = results.get("finetuned", "lora")
    names = [d.short for d in tasks]
    adapters = [str(paths[t]) for t in names]
    arrow = {k: ArrowRouter.from_adapters(adapters, names=names, top_k=k) for k in (1, 3)}
    variants = {
        "Arrow top-1 (data-free)": ("concat", lambda c: arrow[1].gates(c), None),
        "Arrow top-3 (data-free, PEFT default)": ("concat", lambda c: arrow[3].gates(c), None),
        "X-LoRA-style softmax gates (answer loss)": ("concat", softmax_gates, 0.0),
        "CoMoL-style core-space gates (answer loss)": ("core", softmax_gates, 0.0),
        "softmax gates (answer + routing loss)": ("concat", softmax_gates, 1.0),
    }
    for label, (layout, make_gates, route_weight) in variants.items():
        if results.get("tokens", label) is not None:
            continue
        t0 = time.perf_counter()
        attach = attach_core_space if layout == "core" else attach_gated_lora
        controller = attach(split.model, adapters, names=names)
        try:
            controller.set_gates(make_gates(controller))
            record: dict = {}
            with controller.use_weights(torch.ones(len(names))):
                if route_weight is not None:
                    record["training"] = train_token_gates(split, controller, tasks, states, settings, route_weight)
                acc, route_acc = {}, {}
                for i, d in enumerate(tasks):
                    logits, mass = gated_predictions(split, states[d.short]["test"], controller.gates(),
                                                     list(range(len(names))))
                    preds = [int(logits[j, : e.n_options].argmax()) for j, e in enumerate(d.test)]
                    acc[d.short] = mean(int(p == e.answer) for p, e in zip(preds, d.test))
                    route_acc[d.short] = float((mass.argmax(-1) == i).float().mean())
        finally:
            controller.set_gates(None)
            controller.detach()
        norm = normalized(acc, finetuned, "test")
        record.update({"acc": acc, "normalized": norm, "avg_normalized": mean(norm.values()),
                       "routing_accuracy": route_acc, "avg_routing_accuracy": mean(route_acc.values()),
                       "seconds": time.perf_counter() - t0})
        results.put("tokens", label, value=record)
        log(f"  per-token {label}: routing acc {record['avg_routing_accuracy']:.3f}, avg normalized "
            f"{record['avg_normalized']:.3f} ({record['seconds']:.0f}s)")


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
