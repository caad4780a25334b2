"""Compositions that keep the tasks apart: RMM bases (k < N), Twin-Merging bundles, request-level routers and
per-token routers, all on the plain LoRAs and scored on the same test examples as the merges."""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .bench import Bench, adapter_deltas, log, mean, module_deltas, normalized


def _record(bench: Bench, correct: Mapping[str, list], **extra) -> dict:
    norm = normalized(correct, bench.finetuned())
    return {"correct": dict(correct), "normalized": norm, "avg_normalized": mean(norm.values()),
            "min_normalized": min(norm.values()), **extra}


def stage_rmm(bench: Bench, paths: Mapping[str, Path]) -> None:
    """RMM bases with k = N-1 and k = 2 (module and row granularity); each task is rebuilt from the basis and
    evaluated on its own test split."""
    from loramerge.artifacts.basis import build_basis

    n, names = len(bench.tasks), bench.names
    for k, granularity in itertools.product(sorted({n - 1, 2}, reverse=True), ("module", "row")):
        key = f"k{k}_{granularity}"
        if bench.results.get("rmm", key) is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            basis = build_basis([str(paths[t]) for t in names], k, Path(tmp) / "basis", granularity=granularity,
                                names=names)
            seconds = time.perf_counter() - t0
            correct = {}
            for t in names:
                correct.update(bench.correct(module_deltas(basis.task_modules(t)), "test", only=t))
            errors = {t["name"]: t["rel_error"] for t in basis.manifest["tasks"]}
            storage = basis.manifest.get("storage", {}).get("storage_ratio")
        record = _record(bench, correct, k=k, granularity=granularity, rel_error=errors, storage_ratio=storage,
                         seconds=seconds)
        bench.results.put("rmm", key, value=record)
        log(f"  rmm {key}: avg normalized {record['avg_normalized']:.3f}, min {record['min_normalized']:.3f}")


ROUTING_SAMPLE = 100
"""Test prompts per task on which a per-token router's routing accuracy (a diagnostic) is measured."""
TWIN = ((0.3, 8), (0.3, 4), (0.3, 2))
"""Twin bundles: (shared task-arithmetic lambda, residual rank)."""


def stage_twin(bench: Bench, paths: Mapping[str, Path]) -> None:
    """Twin-Merging bundles with oracle routing (the task's own residual at weight 1): the upper bound of any
    router over the bundle; and the shared part alone."""
    from loramerge.artifacts.twin import build_twin, compose_twin

    names = bench.names
    for shared_lambda, residual_rank in TWIN:
        key = f"ta{shared_lambda}_r{residual_rank}"
        if bench.results.get("twin", key) is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            bundle = build_twin([str(paths[t]) for t in names], Path(tmp) / "twin",
                                shared_parameters={"lambda": shared_lambda}, residual_rank=residual_rank, names=names)
            seconds = time.perf_counter() - t0
            correct = {}
            for t in names:
                correct.update(bench.correct(module_deltas(compose_twin(bundle, {t: 1.0})), "test", only=t))
            shared = bench.correct(module_deltas(compose_twin(bundle, {})), "test")
        shared_norm = normalized(shared, bench.finetuned())
        record = _record(bench, correct, shared_lambda=shared_lambda, residual_rank=residual_rank,
                         shared_correct=shared, shared_avg_normalized=mean(shared_norm.values()), seconds=seconds)
        bench.results.put("twin", key, value=record)
        log(f"  twin {key}: oracle avg normalized {record['avg_normalized']:.3f} (shared only "
            f"{record['shared_avg_normalized']:.3f})")


def routed_correct(bench: Bench, routes: Mapping[str, list[str]], deltas_for) -> dict[str, list[int]]:
    """Test correctness when each example runs with the adapter its router picked (top-1)."""
    out = {t: [0] * len(routes[t]) for t in bench.names}
    for chosen in sorted({c for picks in routes.values() for c in picks}):
        for t in bench.names:
            idx = [i for i, c in enumerate(routes[t]) if c == chosen]
            if not idx:
                continue
            if chosen == t or len(idx) > len(routes[t]) // 2:  # the whole split, cached by content
                full = bench.correct(deltas_for(chosen), "test", only=t)[t]
                right = [full[i] for i in idx]
            else:  # a few misrouted examples: only those
                with bench.lm.patched(deltas_for(chosen)):
                    right = bench.lm.correct([bench.enc[t]["test"][i] for i in idx])
            for i, r in zip(idx, right):
                out[t][i] = r
    return out


def stage_routers(bench: Bench, paths: Mapping[str, Path]) -> None:
    """Request-level routers (routers.request) fitted on the base model's pooled hidden states of
    ``router_train`` training prompts per task; routing accuracy on test, and routed composition (plain LoRAs;
    the rank-8 Twin bundle)."""
    from loramerge.artifacts.twin import build_twin, compose_twin
    from routers.request import CentroidRouter, ClassifierRouter, NearestNeighbourRouter

    s, names = bench.settings, bench.names
    layer = min(s.router_layer, bench.lm.n_layers)
    train_enc = {t: bench.enc[t]["train"][: s.router_train] for t in names}
    labels = [t for t in names for _ in train_enc[t]]
    texts = [e.prompt for d in bench.tasks for e in d.train[: s.router_train]]
    embeddings = torch.cat([bench.lm.pooled(train_enc[t], layer) for t in names])
    test_emb = {t: bench.lm.pooled(bench.enc[t]["test"], layer) for t in names}
    lora = {t: adapter_deltas(paths[t]) for t in names}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_twin([str(paths[t]) for t in names], Path(tmp) / "twin", shared_parameters={"lambda": 0.3},
                            residual_rank=8, names=names)
        twin = {t: module_deltas(compose_twin(bundle, {t: 1.0})) for t in names}
    fitters = {
        "centroid": lambda: CentroidRouter.fit((texts, labels), embeddings=embeddings, adapter_names=names),
        "nearest_neighbour": lambda: NearestNeighbourRouter.fit((texts, labels), embeddings=embeddings,
                                                                adapter_names=names),
        "classifier (Twin MLP)": lambda: ClassifierRouter.fit((texts, labels), embeddings=embeddings,
                                                              adapter_names=names, seed=s.seed),
    }
    for kind, fit in fitters.items():
        if bench.results.get("routers", kind) is not None:
            continue
        t0 = time.perf_counter()
        router = fit()
        routes = {t: [names[i] for i in router.route_embeddings(test_emb[t]).argmax(-1).tolist()] for t in names}
        route_acc = {t: sum(r == t for r in routes[t]) / len(routes[t]) for t in names}
        record = {"routing_accuracy": route_acc, "avg_routing_accuracy": mean(route_acc.values()),
                  "fit_seconds": time.perf_counter() - t0, "train_prompts_per_task": len(train_enc[names[0]])}
        for target, deltas in (("lora", lora), ("twin_r8", twin)):
            record[target] = _record(bench, routed_correct(bench, routes, deltas.__getitem__))
        bench.results.put("routers", kind, value=record)
        log(f"  router {kind}: routing acc {record['avg_routing_accuracy']:.3f}, routed LoRA "
            f"{record['lora']['avg_normalized']:.3f}, routed Twin {record['twin_r8']['avg_normalized']:.3f}")


def train_token_gates(bench: Bench, controller, route_loss_weight: float = 0.0) -> dict:
    """Train the installed gates on the union of the training splits: the answer tokens' cross-entropy (plus
    ``route_loss_weight`` x the task-label NLL of the token-averaged gate mass), every other parameter frozen,
    every adapter at weight 1 (the gates decide: ``routers.moe``'s training context)."""
    import torch.nn.functional as F

    from routers.moe import _gates_in_training, adapter_mass, recorded_gates

    s = bench.settings
    pool = [(e, i) for i, t in enumerate(bench.names) for e in bench.enc[t]["train"]]
    gates = controller.gates()
    generator = torch.Generator().manual_seed(s.seed)
    routed = list(range(len(bench.names)))
    losses, started = [], time.perf_counter()
    with _gates_in_training(controller, gates) as params:
        optimizer = torch.optim.Adam(params, lr=s.gate_lr)
        for _ in range(s.gate_steps):
            idx = torch.randint(len(pool), (s.batch_size,), generator=generator).tolist()
            batch = [pool[i][0] for i in idx]
            ids, mask, rows, cols, targets = bench.lm.answer_batch(batch)
            with recorded_gates(gates) as store:
                hidden = bench.lm.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            loss = F.cross_entropy(bench.lm.model.lm_head(hidden[rows, cols]).float(), targets)
            if route_loss_weight:
                mass = adapter_mass(store, mask, routed)
                labels = torch.tensor([pool[i][1] for i in idx])
                loss = loss + route_loss_weight * F.nll_loss(torch.log(mass.clamp_min(1e-9)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    k = max(1, min(10, len(losses) // 2))
    return {"steps": s.gate_steps, "seconds": time.perf_counter() - started,
            "loss_first": mean(losses[:k]), "loss_last": mean(losses[-k:])}


@torch.no_grad()
def routing_accuracy(bench: Bench, gates, index: int, encoded, batch_size: int = 32) -> float:
    """Share of prompts whose gate mass (averaged over tokens and layers) peaks at their own adapter."""
    from routers.moe import adapter_mass, recorded_gates

    hits = 0
    for lo in range(0, len(encoded), batch_size):
        with recorded_gates(gates) as store:
            _, mask = bench.lm._prompt_pass(encoded[lo: lo + batch_size], use_cache=False)
        hits += int((adapter_mass(store, mask, list(range(len(bench.names)))).argmax(-1) == index).sum())
    return hits / len(encoded)


def stage_tokens(bench: Bench, paths: Mapping[str, Path]) -> None:
    """Per-token routing over the LoRAs attached as gated layers (routers.gated): Arrow (data-free, top-1 and
    PEFT's top-3), X-LoRA-style softmax gates on each layer's input and CoMoL-style core-space gates (answer
    loss on the union of the training splits, LoRAs frozen), and softmax gates with an added task-label
    routing loss."""
    from routers.gated import attach_gated_lora
    from routers.moe import attach_core_space, softmax_gates
    from routers.request import ArrowRouter

    names = bench.names
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
        if bench.results.get("tokens", label) is not None:
            continue
        t0 = time.perf_counter()
        attach = attach_core_space if layout == "core" else attach_gated_lora
        controller = attach(bench.lm.model, adapters, names=names)
        try:
            controller.set_gates(make_gates(controller))
            extra: dict = {}
            with controller.use_weights(torch.ones(len(names))):
                if route_weight is not None:
                    extra["training"] = train_token_gates(bench, controller, route_weight)
                correct = {t: bench.lm.correct(bench.enc[t]["test"]) for t in names}
                route_acc = {t: routing_accuracy(bench, controller.gates(), i,
                                                 bench.enc[t]["test"][: ROUTING_SAMPLE])
                             for i, t in enumerate(names)}
        finally:
            controller.set_gates(None)
            controller.detach()
        record = _record(bench, correct, routing_accuracy=route_acc, avg_routing_accuracy=mean(route_acc.values()),
                         seconds=time.perf_counter() - t0, **extra)
        bench.results.put("tokens", label, value=record)
        log(f"  per-token {label}: routing acc {record['avg_routing_accuracy']:.3f}, avg normalized "
            f"{record['avg_normalized']:.3f} ({record['seconds']:.0f}s)")
