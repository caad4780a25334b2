"""``loramerge route train|eval``: write a router artifact from adapters and labelled examples; score it.

A Typer app named ``app`` that the main command mounts as ``loramerge route``. Data goes through the one
data reader (``loramerge.data.examples``): JSONL lines with a ``task`` (the adapter that should serve the
example; or a file per adapter, ``--data NAME=FILE``) and either ``text`` or ``prompt`` + ``options`` +
``label``, the same files ``calibrate`` and ``tune`` read (LoraHub reads the new task's ``input``/``output``
lines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loramerge.cli.common import console, fail
from loramerge.errors import LoramergeError

# the command's module stays light (``loramerge --help`` imports it): torch and the routers load on use

app = typer.Typer(name="route", no_args_is_help=True, add_completion=False,
                  help="Routers: pick each prompt's adapter mixture (centroid, knn, classifier, arrow, moe, lorahub).")

DATA_HELP = ("JSONL, one example per line: a 'task' (the adapter that should serve it) and 'text', or 'prompt' + "
             "'options' + 'label' (routed on the prompt); repeat as --data NAME=FILE for a file per adapter "
             "(lines need no task). LoraHub: the new task's {'input', 'output'} (or 'text') lines.")
SEE = " Default: the router's own (`loramerge route kinds`)."
KINDS = ("centroid", "knn", "classifier", "arrow", "moe", "lorahub")  # registry.TRAINABLE_KINDS (tested equal)


@app.command("train")
def train(
    adapters: list[str] = typer.Argument(None, help="Adapters to route over: name=path or path (name = directory name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the router artifact."),
    kind: str = typer.Option("classifier", help=f"Router: {', '.join(KINDS)}."),
    data: list[str] | None = typer.Option(None, help=DATA_HELP),
    base_model: Path | None = typer.Option(None, "--base-model", help="Base model directory (for base-model "
                                                                     "embeddings, arrow per request, moe, lorahub)."),
    embedder: str = typer.Option("base", help="centroid/knn/classifier features: 'base' (pooled hidden state) or "
                                              "'minilm' (all-MiniLM-L6-v2, offline)."),
    layer: int = typer.Option(-1, help="Hidden layer to pool for 'base' embeddings (-1: the last)."),
    twin: Path | None = typer.Option(None, help="Twin-Merging bundle: route over its tasks, embed with its shared model."),
    top_k: int | None = typer.Option(None, "--top-k", help="Adapters kept per prompt/token (knn: neighbours)." + SEE),
    temperature: float | None = typer.Option(None, help="Softmax temperature." + SEE),
    epochs: int | None = typer.Option(None, help="Training epochs (classifier, moe)." + SEE),
    lr: float | None = typer.Option(None, help="Learning rate (classifier, moe)." + SEE),
    space: str | None = typer.Option(None, help="moe: 'gated' (X-LoRA-style gate on the layer input) or 'core' "
                                                "(CoMoL-style)." + SEE),
    mode: str | None = typer.Option(None, help="arrow: route per 'token' or per 'request'." + SEE),
    budget: int | None = typer.Option(None, help="lorahub: loss evaluations." + SEE),
    seed: int = typer.Option(0, help="Seed for training and search."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Train (or build, for data-free Arrow) a router over ADAPTERS and write it to OUTPUT."""
    try:
        router = build_router(adapters or [], kind=kind, data=_data_source(data), base_model=base_model, embedder=embedder,
                              layer=layer, twin=twin, top_k=top_k, temperature=temperature, epochs=epochs, lr=lr,
                              space=space, mode=mode, budget=budget, seed=seed)
        out = router.save(output, force=force)
    except LoramergeError as exc:
        fail(exc)
        return
    console.print(f"wrote a {router.kind} router over {', '.join(router.adapter_names)} to {out}")


def _data_source(items: list[str] | None):
    """``--data`` values: one file, several files, or NAME=FILE items (the data reader's CLI form)."""
    if not items:
        return None
    from loramerge.data.examples import parse_data_specs

    return parse_data_specs(items)


def build_router(adapters: list[str], *, kind: str, data=None, base_model: Path | None = None,
                 embedder: str = "base", layer: int = -1, twin: Path | None = None, top_k: int | None = None,
                 temperature: float | None = None, epochs: int | None = None, lr: float | None = None,
                 space: str | None = None, mode: str | None = None, budget: int | None = None, seed: int = 0):
    """The work behind ``route train``: the registry's class for ``kind`` builds itself from the inputs.

    Settings left at None take the router class's own defaults (its ``Options``); a setting the kind does
    not take is refused before any work.
    """
    from .inputs import RouterInputs
    from .registry import router_class, router_options

    options = router_options(kind, {"top_k": top_k, "temperature": temperature, "epochs": epochs, "lr": lr,
                                    "space": space, "mode": mode, "budget": budget})
    inputs = RouterInputs(list(adapters), data=data, base_model=base_model, embedder=embedder, layer=layer,
                          twin=twin, seed=seed)
    return router_class(kind, trainable=True).from_inputs(inputs, options)


@app.command("kinds")
def kinds() -> None:
    """The router kinds `route train` builds, and the settings each takes with its defaults."""
    import dataclasses

    from .registry import ROUTERS, TRAINABLE_KINDS

    table = Table(title="router kinds (route train)")
    for col in ("kind", "settings (defaults)", "what"):
        table.add_column(col)
    for kind in TRAINABLE_KINDS:
        cls = ROUTERS[kind]
        settings = ", ".join(f"--{f.name.replace('_', '-')} {'all' if f.default is None else f.default}"
                             for f in dataclasses.fields(cls.Options))
        table.add_row(kind, settings, (cls.__doc__ or "").strip().splitlines()[0].replace("``", ""))
    console.print(table)


@app.command("eval")
def evaluate(
    router_dir: Path = typer.Argument(..., help="Router artifact directory."),
    data: list[str] = typer.Option(..., help=DATA_HELP),
    base_model: Path | None = typer.Option(None, "--base-model", help="Base model (for base-model embeddings, "
                                                                     "arrow, moe, and task scores)."),
    adapters: list[str] = typer.Option(None, "--adapter", "-a", help="name=path of an adapter the router routes "
                                                                     "over (repeat); with --base-model, also scores "
                                                                     "the LM loss per task."),
    twin: Path | None = typer.Option(None, help="The Twin-Merging bundle the router was trained for."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Routing accuracy (overall, per task, confusion) of ROUTER_DIR on DATA; LM loss per task when adapters are given."""
    try:
        result = evaluate_router(router_dir, _data_source(data), base_model=base_model, adapters=adapters or [], twin=twin)
    except LoramergeError as exc:
        fail(exc)
        return
    _print_eval(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def evaluate_router(router_dir: Path, data, *, base_model: Path | None = None, adapters: list[str] = (),
                    twin: Path | None = None) -> dict:
    """Routing accuracy and (with a model and adapters) mean LM loss per task: routed / oracle / uniform."""
    from .artifact import read_artifact
    from .data import task_examples
    from .inputs import attach, load_base, parse_adapters
    from .registry import load_router

    texts, labels = task_examples(data)
    model = tokenizer = controller = None
    if base_model is not None:
        model, tokenizer = load_base(base_model, needed_for="evaluation")
    names, paths = parse_adapters(list(adapters))
    if model is not None and (paths or twin is not None):
        core = read_artifact(router_dir).config.get("layer") == "core"
        controller = attach(model, names, paths, twin, core=core)
    router = load_router(router_dir, model=model, tokenizer=tokenizer, controller=controller)
    predicted = router.predict(texts)
    tasks = sorted(set(labels) | set(router.adapter_names))
    confusion = {t: {p: 0 for p in tasks} for t in tasks}
    for y, p in zip(labels, predicted, strict=True):
        confusion[y][p] += 1
    per_task = {t: confusion[t][t] / max(sum(confusion[t].values()), 1) for t in sorted(set(labels))}
    result: dict[str, Any] = {
        "router": str(router_dir), "kind": router.kind, "examples": len(texts),
        "accuracy": sum(y == p for y, p in zip(labels, predicted, strict=True)) / max(len(texts), 1),
        "per_task_accuracy": per_task, "confusion": confusion,
    }
    if controller is not None and tokenizer is not None:
        result["lm_loss"] = task_scores(controller, tokenizer, router, texts, labels)
    return result


def task_scores(controller, tokenizer, router, texts: list[str], labels: list[str]) -> dict[str, dict[str, float]]:
    """Mean LM loss per task with the router's composition, the gold adapter (oracle) and the uniform mean."""
    import torch


    with torch.no_grad():
        return _task_scores(controller, tokenizer, router, texts, labels)


def _task_scores(controller, tokenizer, router, texts: list[str], labels: list[str]) -> dict[str, dict[str, float]]:
    import torch

    from .lm_loss import ensure_pad_token, lm_batch, per_sample_lm_loss

    ensure_pad_token(tokenizer)
    routed_names = [n for n in controller.adapter_names if n not in controller.fixed]
    out: dict[str, dict[str, float]] = {}
    for task in sorted(set(labels)):
        chunk = [t for t, y in zip(texts, labels, strict=True) if y == task]
        ids, mask, lm_labels = lm_batch(tokenizer, chunk, 512)
        uniform = torch.full((1, len(routed_names)), 1.0 / len(routed_names))
        schemes = {"uniform": controller.routed(uniform, routed_names)}
        if task in controller.adapter_names:
            schemes["oracle"] = controller.routed(torch.ones(1, 1), [task])
        losses = {}
        with router.applied(controller, chunk):
            losses["routed"] = float(per_sample_lm_loss(controller.model(input_ids=ids, attention_mask=mask).logits,
                                                        lm_labels).mean())
        for scheme, weights in schemes.items():
            with controller.use_weights(weights):
                logits = controller.model(input_ids=ids, attention_mask=mask).logits
            losses[scheme] = float(per_sample_lm_loss(logits, lm_labels).mean())
        out[task] = losses
    return out


def _print_eval(result: dict) -> None:
    console.print(f"{result['kind']} router: routing accuracy [bold]{result['accuracy']:.3f}[/] "
                  f"on {result['examples']} examples")
    table = Table(title="per task")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    scores = result.get("lm_loss", {})
    for col in ("routed", "oracle", "uniform"):
        if scores:
            table.add_column(f"LM loss ({col})", justify="right")
    for task, acc in result["per_task_accuracy"].items():
        row = [task, f"{acc:.3f}"]
        if scores:
            row += [f"{scores[task].get(c, float('nan')):.3f}" for c in ("routed", "oracle", "uniform")]
        table.add_row(*row)
    console.print(table)


__all__ = ["app", "build_router", "evaluate_router", "task_scores"]
