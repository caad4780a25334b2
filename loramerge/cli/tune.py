"""``loramerge tune`` and ``loramerge adamerging``: merging that learns from a little data.

The application layer: it wires the core tuner (``loramerge.data.tune``) to the AdaMerging preparer of
``loramerge.routers.adamerging`` (which trains the gated LoRA's gates); the core never imports routers.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from loramerge.cli.common import console, err_console, fail
from loramerge.errors import LoramergeError, RecipeError


def parse_adapter_items(items: list[str]) -> tuple[list[str], list[Path]]:
    """``name=path`` or ``path`` (named after its directory) -> (names, paths)."""
    from loramerge.core.names import parse_pair

    names, paths = [], []
    for item in items:  # a path that exists wins over a NAME=PATH reading of it
        name, path = (Path(item).name, item) if Path(item).exists() else parse_pair(
            item, option="adapter", name_optional=True)
        names.append(name)
        paths.append(Path(path))
    if len(set(names)) != len(names):
        raise RecipeError(f"adapter names repeat: {names}", fix="name them: name=path")
    return names, paths


def _methods(text: str) -> tuple[str, ...]:
    from loramerge.merging.methods import get_method

    return tuple(get_method(m.strip()).name for m in text.split(",") if m.strip())


def tune_command(
    adapters: list[str] = typer.Argument(..., help="Adapters: name=path or path (name = directory name); each "
                                         "name is a task of the validation data."),
    data: list[str] = typer.Option(..., "--data", "--val", help="Validation data: a JSONL with a 'task' per line, "
                                   "or name=file per adapter. Lines: {prompt, options, label} or {text}."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for adapter/, report.json, report.md, "
                                "search.png and cache/ (rerun the same command to resume)."),
    base: str | None = typer.Option(None, help="Base model directory or hub id (default: the adapters' base)."),
    trials: int | None = typer.Option(None, help="Budget: total number of trials (resumed trials count)."),
    minutes: float | None = typer.Option(None, help="Budget: minutes of searching in this run."),
    methods: str = typer.Option("task_arithmetic,ties,dare_ties,magnitude_prune,tsv,iso_c,lines,regmean,fisher,"
                                "adamerging", help="Comma-separated registry names to search (regmean and fisher "
                                "are calibrated once on the validation prompts, adamerging trained once)."),
    post: bool = typer.Option(False, "--lines/--no-lines", help="Also search LiNeS as a post-step on every method."),
    weights: bool = typer.Option(True, "--weights/--no-weights", help="Also search one weight per adapter."),
    sampler: str = typer.Option("tpe", help="tpe (method choice + conditional parameters), cmaes (continuous "
                                "parameters only; needs the cmaes package) or random."),
    slice_size: int = typer.Option(32, "--slice", help="Examples per task scored in every trial."),
    top_k: int = typer.Option(3, help="Best configurations re-scored on the whole validation set."),
    rank: str = typer.Option("auto", help="Rank policy of the merges: auto, exact, max, an integer."),
    seed: int = typer.Option(0),
    ada_objective: str = typer.Option("entropy", help="AdaMerging's objective: entropy (unlabeled) or loss."),
    ada_steps: int = typer.Option(100, help="AdaMerging's training steps."),
    batch_size: int = typer.Option(16),
    max_length: int | None = typer.Option(None, help="Truncate longer sequences from the left (and say so)."),
    force: bool = typer.Option(False, "--force", help="Replace the results of a finished tune at --output."),
) -> None:
    """Search method x parameters x per-adapter weights on validation data; write the best merged adapter."""
    from loramerge.data.tune import (
        SearchSpace,
        Tuner,
        base_model_of,
        check_budget,
        check_output,
        check_space,
        load_causal_lm,
        read_validation,
    )
    from loramerge.data.tune_report import write_outputs

    tuner = None
    try:
        check_budget(trials, minutes)
        names, paths = parse_adapter_items(adapters)
        check_output(output, force)
        from loramerge.data.examples import parse_data_specs
        from loramerge.io.writer import check_output_path

        check_output_path(output / "adapter", force=True, inputs=paths)  # overlap and permissions, up front

        examples = read_validation(parse_data_specs(data), names)
        space = SearchSpace(methods=_methods(methods), weights=weights, rank=int(rank) if rank.isdigit() else rank,
                            post=post)
        preparers = {}
        if "adamerging" in space.methods:
            from loramerge.routers.adamerging import tune_preparer

            preparers["adamerging"] = tune_preparer(objective=ada_objective, steps=ada_steps)
        check_space(space, preparers)
        base = base or base_model_of(paths)
        model, tokenizer = load_causal_lm(base)
        tuner = Tuner(model, tokenizer, paths, names, examples, cache_dir=output / "cache", space=space,
                      slice_size=slice_size, top_k=top_k, seed=seed, preparers=preparers, batch_size=batch_size,
                      max_length=max_length, base_id=str(base), show_progress=True)
        result = tuner.run(trials=trials, minutes=minutes, sampler=sampler)
        outputs = write_outputs(tuner, result, output, force=force)
    except KeyboardInterrupt:
        done = "" if tuner is None else f" ({tuner.evaluated} configurations scored in this run are cached)"
        err_console.print(f"[red]interrupted[/]{done}: rerun the same command to resume from {output / 'cache'}")
        raise typer.Exit(130) from None
    except LoramergeError as exc:
        fail(exc)
    table = Table(title="loramerge tune: best configurations (mean normalized validation score)")
    for col in ("trial", "method", "slice", "full"):
        table.add_column(col)
    for t in sorted([t for t in result.trials if t.full_score is not None], key=lambda t: -(t.full_score or 0)):
        table.add_row(str(t.number), t.config["method"], f"{t.score:.3f}", f"{t.full_score:.3f}")
    table.add_row("default", "task_arithmetic", f"{result.baseline.score:.3f}", f"{result.baseline.full_score:.3f}")
    console.print(table)
    console.print(f"best: {result.best.config['method']} (full score {result.best.full_score:.3f} vs default "
                  f"{result.baseline.full_score:.3f}); {len(result.trials)} trials, {result.evaluated} evaluations "
                  "computed in this run (the rest from the cache)")
    for kind, path in outputs.items():
        console.print(f"  {kind}: {path}")


def adamerging_command(
    adapters: list[str] = typer.Argument(..., help="Adapters: name=path or path; names match the data's tasks."),
    data: list[str] = typer.Option(..., "--data", help="Prompts per task (the shared reader's formats; labels "
                                   "are read only by --objective loss)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the static PEFT adapter."),
    base: str | None = typer.Option(None, help="Base model directory or hub id (default: the adapters' base)."),
    objective: str = typer.Option("entropy", help="entropy (unlabeled, the paper) or loss (supervised)."),
    position: str = typer.Option("auto", help="Entropy at the 'last' prompt token (the answer position), over "
                                 "'all' tokens, or 'auto' (last for prompts, all for texts)."),
    granularity: str = typer.Option("layer", help="layer (lambda per task and block), task, or module."),
    init: float = typer.Option(0.3, help="Initial lambda (task arithmetic's)."),
    low: float = typer.Option(0.0, help="Lower clamp of lambda."),
    high: float = typer.Option(1.0, help="Upper clamp of lambda."),
    steps: int = typer.Option(100),
    lr: float = typer.Option(0.01),
    batch_size: int = typer.Option(8, help="Examples per task per step."),
    heldout: float = typer.Option(0.25, help="Fraction of each task's prompts held out for early stopping."),
    seed: int = typer.Option(0),
    report: Path | None = typer.Option(None, help="Also write the training history as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """AdaMerging: learn task- and layer-wise coefficients on prompts, write one static PEFT adapter."""
    from loramerge.data.examples import parse_data_specs
    from loramerge.data.scoring import ValidationTask
    from loramerge.data.tune import base_model_of, load_causal_lm, read_validation
    from loramerge.io.writer import check_output_path

    try:
        if objective not in ("entropy", "loss") or position not in ("auto", "last", "all") or \
                granularity not in ("layer", "task", "module"):
            raise RecipeError("bad --objective, --position or --granularity",
                              fix="objective: entropy|loss; position: auto|last|all; granularity: layer|task|module")
        names, paths = parse_adapter_items(adapters)
        check_output_path(output, force=force, inputs=paths)
        examples = read_validation(parse_data_specs(data), names)
        tasks = [ValidationTask.from_examples(n, examples[n]) for n in names]
        model, tokenizer = load_causal_lm(base or base_model_of(paths))
        from loramerge.routers.adamerging import export_static, learn_coefficients

        result = learn_coefficients(model, tokenizer, paths, tasks, names=names, objective=objective,  # type: ignore[arg-type]
                                    position=position, granularity=granularity, init=init,  # type: ignore[arg-type]
                                    bounds=(low, high), steps=steps, lr=lr, batch_size=batch_size, heldout=heldout,
                                    seed=seed, show_progress=True)
        merged = export_static(paths, names, result, output, force=force)
    except LoramergeError as exc:
        fail(exc)
    if report is not None:
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    console.print(f"adamerging: held-out {objective} {result.initial_heldout:.4f} -> {result.best_heldout:.4f} "
                  f"(best at step {result.best_step}, {result.seconds:.1f}s); "
                  f"{len(result.coefficients)} groups x {len(names)} adapters")
    console.print(f"wrote {merged.output} (method adamerging, total rank {merged.total_rank}; the coefficients "
                  "are in its loramerge.json)")
