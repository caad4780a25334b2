"""The ``loramerge`` command: verbs over adapters and artifacts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from loramerge.cli.common import console, err_console, fail, json_safe
from loramerge.cli.options import check_device, check_writable_file, parse_method_params, parse_rank, parse_weights
from loramerge.errors import LoramergeError, OutputError

app = typer.Typer(
    name="loramerge", no_args_is_help=True, add_completion=False,
    help="Merge, route and serve LoRA adapters in LoRA's own low-rank space.",
)
log = logging.getLogger("loramerge")


class State:
    quiet = False


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors and the final result."),
    threads: int = typer.Option(1, "--threads", envvar="LORAMERGE_THREADS",
                                help="torch CPU threads. 1 is fastest for the small QR/SVD calls and on a busy "
                                "machine; raise it for large element-wise merges on an idle one."),
) -> None:
    import torch
    from rich.logging import RichHandler

    torch.set_num_threads(max(threads, 1))

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    State.quiet = quiet




def _report_table(result) -> Table:
    table = Table(title=f"merged with {result.method.name} in {result.seconds:.2f}s")
    for col in ("module", "input ranks", "rank", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in result.reports:
        table.add_row(r.name, ",".join(map(str, r.input_ranks)), str(r.rank), f"{r.rel_error:.2e}")
    return table


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="YAML recipe (method, adapters, parameters, rank, dtype)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the merged PEFT adapter."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    device: str = typer.Option("cpu", help="Where to compute: cpu, cuda, cuda:1, ..."),
    rank: str | None = typer.Option(None, help="Override the recipe's rank: exact, auto, max, an integer, energy:0.99."),
    dtype: str | None = typer.Option(None, help="Override the output dtype: auto, float32, float16, bfloat16."),
    seed: int | None = typer.Option(None, help="Override the recipe's seed (DARE, DELLA)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled adapter_model.bin inputs (runs code from the file)."),
    report: Path | None = typer.Option(None, help="Also write the per-module report as JSON here."),
) -> None:
    """Merge the adapters of RECIPE into one PEFT adapter at OUTPUT."""
    from loramerge.merging.engine import merge as run
    from loramerge.merging.recipe import load_recipe, parse_recipe

    try:
        check_device(device)
        rank_value = parse_rank(rank)
        check_writable_file(report, "--report")
        parsed = load_recipe(recipe)
        overrides: dict = {}
        if rank is not None:
            overrides["rank"] = rank_value
        if dtype is not None:
            overrides["dtype"] = dtype
        if seed is not None:
            overrides["seed"] = seed
        if allow_pickle:
            overrides["allow_pickle"] = True
        if overrides:
            parsed = parse_recipe({**parsed.model_dump(exclude_none=True), **overrides}, source=str(recipe))
        result = run(parsed, output, force=force, device=device, show_progress=not State.quiet)
    except LoramergeError as exc:
        fail(exc)
        return
    if not State.quiet:
        console.print(_report_table(result))
    console.print(
        f"wrote {result.output}  (method {result.method.name}, {len(result.modules)} modules, "
        f"total rank {result.total_rank}, max rel. error {result.max_rel_error:.2e})"
    )
    if report is not None:
        try:
            report.write_text(json.dumps([vars(r) for r in result.reports], indent=2))
        except OSError as exc:
            fail(OutputError(f"the adapter was written to {result.output}, but not the report: {exc}",
                             path=str(report), fix="the adapter is complete; rerun with a writable --report path"))


@app.command()
def inspect(
    adapters: list[str] = typer.Argument(..., help="Adapter directories or hub ids."),
    modules: bool = typer.Option(False, "--modules", help="Show every module's statistics."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled adapter_model.bin inputs."),
) -> None:
    """Ranks, target modules, scale, norms, effective rank, and pairwise overlap between adapters."""
    from loramerge.analysis.inspect import pairwise_overlap, summarize
    from loramerge.core.adapter import load_adapter

    try:
        loaded = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
        summaries = [summarize(a) for a in loaded]
        pairs = pairwise_overlap(loaded) if len(loaded) > 1 else []
    except LoramergeError as exc:
        fail(exc)
        return
    if as_json:
        non_finite: list[str] = []  # NaN/Inf statistics become null, and their JSON paths are listed
        body = json_safe({"adapters": [s.to_dict() for s in summaries], "pairs": [vars(p) for p in pairs]}, non_finite)
        print(json.dumps({**body, "non_finite": non_finite}, indent=2, allow_nan=False))
        return
    table = Table(title="adapters")
    for col in ("name", "base model", "r", "alpha", "rsLoRA", "modules", "total rank", "params", "dtype",
                "mean eff. rank", "targets"):
        table.add_column(col)
    for s in summaries:
        targets = s.target_modules if isinstance(s.target_modules, str) else ",".join(s.target_modules or [])
        table.add_row(s.name, str(s.base_model), str(s.r), f"{s.lora_alpha:g}", "yes" if s.use_rslora else "no",
                      str(s.n_modules), str(s.total_rank), f"{s.parameters:,}", s.dtype, f"{s.mean_effective_rank:.2f}",
                      targets)
    console.print(table)
    if modules:
        for s in summaries:
            mt = Table(title=f"{s.name}: modules")
            for col in ("module", "rank", "scale", "|dW|_F", "eff. rank", "stable rank"):
                mt.add_column(col)
            for m in s.modules:
                mt.add_row(m.name, str(m.rank), f"{m.scale:.4g}", f"{m.norm:.4g}", f"{m.effective_rank:.2f}",
                           f"{m.stable_rank:.2f}")
            console.print(mt)
    if pairs:
        pt = Table(title="pairwise overlap (means over shared modules)")
        for col in ("pair", "shared modules", "cosine", "subspace overlap", "most opposed module"):
            pt.add_column(col)
        for p in pairs:
            pt.add_row(f"{p.first} / {p.second}", str(p.shared_modules), f"{p.cosine:+.3f}",
                       f"{p.subspace_overlap:.3f}",
                       f"{p.worst_cosine_module} ({p.worst_cosine:+.3f})" if p.worst_cosine_module else "-")
        console.print(pt)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the merge methods: name, kind, exactness, parameters and paper."""
    from loramerge.merging.methods import REGISTRY

    rows = []
    for m in REGISTRY.values():
        params = {name: f.default for name, f in m.config_cls.model_fields.items()}
        rows.append({"name": m.name, "aliases": list(m.aliases), "kind": m.kind, "exact": m.exact, "data": m.data,
                     "factorwise": m.factorwise is not None, "parameters": params, "paper": m.paper, "url": m.url,
                     "summary": m.summary})
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="merge methods")
    for col in ("name", "kind", "exact", "factorwise", "parameters (defaults)", "paper"):
        table.add_column(col)
    for r in rows:
        params = ", ".join(f"{k.rstrip('_')}={v}" for k, v in r["parameters"].items())
        table.add_row(r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""), r["kind"],
                      "yes" if r["exact"] else "no", "yes" if r["factorwise"] else "", params, r["paper"])
    console.print(table)


@app.command()
def compare(
    adapters: list[str] = typer.Argument(..., help="Adapter directories or hub ids."),
    output: Path = typer.Option(..., "--output", "-o", help="Work directory: one merged adapter per method, plus a plot."),
    methods_: str = typer.Option("task_arithmetic,average,ties,dare_ties,della,breadcrumbs", "--methods",
                                 help="Comma-separated registry names."),
    weights: str | None = typer.Option(None, help="Comma-separated weights, one per adapter."),
    rank: str = typer.Option("auto", help="Rank policy for every method: exact, auto, max, an integer."),
    params: str | None = typer.Option(None, help='Per-method parameters as JSON: {"ties": {"density": 0.3}}.'),
    base: Path | None = typer.Option(None, help="Base model directory, to also measure task loss."),
    data: Path | None = typer.Option(None, help='JSONL of {"text", "task"} lines for the task loss (needs --base).'),
    force: bool = typer.Option(False, "--force", help="Replace an earlier comparison's files in --output."),
) -> None:
    """Merge the same adapters with several methods and compare rank, size, error, time (and task loss)."""
    from loramerge.analysis.compare import (
        CompareRow,
        LossEvaluator,
        compare_methods,
        load_task_texts,
        plot_rows,
        render_table,
    )

    try:
        per_method = parse_method_params(params)
        runs = [(m.strip(), {"rank": parse_rank(rank), "parameters": per_method.get(m.strip(), {})})
                for m in methods_.split(",") if m.strip()]
        w = parse_weights(weights, len(adapters))
        evaluator = None
        if (base is None) != (data is None):
            raise LoramergeError("--base and --data go together", fix="give both, or neither")
        rows: list[CompareRow] = []
        if base is not None and data is not None:
            evaluator = LossEvaluator(base, load_task_texts(data))
            rows.append(CompareRow("base model (no adapter)", losses=evaluator(None), reference=True))
        rows += compare_methods(adapters, runs, output, evaluator=evaluator, weights=w, force=force)
    except (ValueError, json.JSONDecodeError) as exc:
        fail(LoramergeError(f"bad option: {exc}", fix="see loramerge compare --help"))
        return
    except LoramergeError as exc:
        fail(exc)
        return
    console.print(render_table(rows, f"{len(adapters)} adapters, rank policy {rank}"))
    plot = plot_rows(rows, Path(output) / "comparison.png", "loramerge compare")
    if plot:
        console.print(f"plot: {plot}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo_out"), "--workdir", "-w", help="Where the demo writes its model and adapters."),
) -> None:
    """Build a tiny base model and adapters locally, merge them with several methods, compare, generate,
    then answer routed requests."""
    from loramerge.demo.run import run_demo
    from loramerge.routers.demo import run_routed_demo

    try:
        import torch

        wide = console if console.width >= 140 or console.is_terminal else Console(width=140)
        _, adapters = run_demo(workdir, threads=torch.get_num_threads(), console=wide)
        wide.print("\n[bold]routing[/]: the prompt picks the adapters, per request, in one batched generate call")
        run_routed_demo(Path(workdir) / "base", adapters, wide)
    except LoramergeError as exc:
        fail(exc)


@app.command()
def version() -> None:
    """Print the loramerge version."""
    from loramerge.version import __version__

    print(__version__)


def _mount_subcommands() -> None:
    """Verb groups that live in their own files (artifacts, routing, serving, ecosystem)."""
    from loramerge.cli.artifacts import basis_app, twin_app
    from loramerge.cli.export import bake_command, push_command
    from loramerge.cli.training import lori_app, osrm_app

    app.add_typer(basis_app, name="basis", help="Reversible basis merging (RMM): build a basis, extract any task.")
    app.add_typer(twin_app, name="twin", help="Twin-Merging bundles: shared adapter + compressed task experts.")
    # The CLI is the application layer: it mounts the routers' and serving verbs. Library modules of
    # the core never import loramerge.routers or loramerge.serving.
    from loramerge.routers.cli import app as route_app

    app.add_typer(route_app, name="route", help="Train and evaluate routers over LoRA adapters.")
    from loramerge.serving.cli import serve as serve_command

    app.command("serve")(serve_command)
    app.command("bake")(bake_command)
    app.command("push")(push_command)
    app.add_typer(osrm_app, name="osrm", help="OSRM: initialise LoRA A orthogonal to the other tasks' inputs.")
    app.add_typer(lori_app, name="lori", help="LoRI: frozen random A, sparse B masks and checks.")
    from loramerge.cli.tune import adamerging_command, tune_command

    app.command("tune")(tune_command)
    app.command("adamerging")(adamerging_command)
    from loramerge.cli.data import calibrate_command  # issue 11: statistics for the data-informed methods

    app.command("calibrate")(calibrate_command)


_mount_subcommands()


def run_app() -> None:
    app()


def main() -> None:
    """Kept for ``python -m loramerge.cli.app``; the console script is ``loramerge.cli.entry:main``."""
    from loramerge.cli.entry import main as entry_main

    entry_main()


if __name__ == "__main__":
    main()
