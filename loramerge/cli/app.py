"""The ``loramerge`` command: verbs over adapters and artifacts.

Start-up stays fast: this module imports no torch; each verb imports what it needs when it runs, and
the verb groups in other files (``LAZY_VERBS``) are imported only when invoked (see cli/lazy.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from loramerge.cli.common import console, err_console, fail, json_safe
from loramerge.cli.lazy import LazyVerb, LazyVerbs
from loramerge.cli.options import check_device, check_writable_file, parse_method_params, parse_rank, parse_weights
from loramerge.errors import LoramergeError, OutputError

LAZY_VERBS: dict[str, LazyVerb] = {
    "basis": LazyVerb("loramerge.cli.artifacts:basis_app",
                      "Reversible basis merging (RMM): build a basis, extract any task."),
    "twin": LazyVerb("loramerge.cli.artifacts:twin_app",
                     "Twin-Merging bundles: shared adapter + compressed task experts."),
    # The CLI is the application layer: it mounts the routers' and the server's verbs. Library modules
    # of the core never import loramerge.routers or loramerge.serving.
    "route": LazyVerb("loramerge.routers.cli:app", "Train and evaluate routers over LoRA adapters."),
    "serve": LazyVerb("loramerge.serving.cli:serve",
                      "Serve adapters and per-request mixtures behind an OpenAI-compatible API."),
    "bake": LazyVerb("loramerge.cli.export:bake_command", "Merge an adapter into its base model's weights."),
    "push": LazyVerb("loramerge.cli.export:push_command", "Upload an adapter or model folder to the Hub."),
    "osrm": LazyVerb("loramerge.cli.training:osrm_app",
                     "OSRM: initialise LoRA A orthogonal to the other tasks' inputs."),
    "lori": LazyVerb("loramerge.cli.training:lori_app", "LoRI: frozen random A, sparse B masks and checks."),
    "tune": LazyVerb("loramerge.cli.tune:tune_command",
                     "Search method, parameters and weights on validation data; write the best merge."),
    "adamerging": LazyVerb("loramerge.cli.tune:adamerging_command",
                           "AdaMerging: learn task- and layer-wise coefficients on prompts."),
    "calibrate": LazyVerb("loramerge.cli.data:calibrate_command",
                          "Calibration statistics (input Grams, Fisher factors) for the data-informed methods."),
}


class _Verbs(LazyVerbs):
    lazy_verbs = LAZY_VERBS


app = typer.Typer(
    name="loramerge", cls=_Verbs, no_args_is_help=True, add_completion=False,
    help="Merge, route and serve LoRA adapters in LoRA's own low-rank space.",
)
log = logging.getLogger("loramerge")


class State:
    quiet = False
    verbose = False


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging (and merge's per-module table)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors and the final result."),
    threads: int = typer.Option(1, "--threads", envvar="LORAMERGE_THREADS",
                                help="torch CPU threads. 1 is fastest for the small QR/SVD calls and on a busy "
                                "machine; raise it for large element-wise merges on an idle one."),
) -> None:
    from rich.logging import RichHandler

    set_threads(threads)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    State.quiet, State.verbose = quiet, verbose


def set_threads(threads: int) -> None:
    """torch's CPU threads, without importing torch for verbs that never use it."""
    threads = max(threads, 1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:  # read by torch when a verb imports it
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)


def _report_table(result):
    from rich.table import Table

    table = Table(title=f"merged with {result.method.name} in {result.seconds:.2f}s")
    for col in ("module", "input ranks", "rank", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in result.reports:
        table.add_row(r.name, ",".join(map(str, r.input_ranks)), str(r.rank), f"{r.rel_error:.2e}")
    return table


def merge_summary(result) -> list[str]:
    """The few lines ``merge`` prints: modules, rank range, worst error, time, output."""
    low, high = result.rank_range
    ranks = f"rank {low}" if low == high else f"ranks {low}..{high}"
    worst = max(result.reports, key=lambda r: r.rel_error, default=None)
    error = f"{worst.rel_error:.2e} ({worst.name})" if worst is not None and worst.rel_error > 0 else "0 (exact)"
    return [
        f"merged {len(result.adapters)} adapters with {result.method.name} in {result.seconds:.2f}s",
        f"  modules      {len(result.modules)} ({ranks}, total {result.total_rank})",
        f"  worst error  {error}",
        f"  wrote        {result.output}",
    ]


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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the per-module table (module, ranks, error)."),
) -> None:
    """Merge the adapters of RECIPE into one PEFT adapter at OUTPUT.

    Prints a summary; the full per-module report is in OUTPUT/loramerge.json (and --verbose prints it).
    """
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
    if verbose or State.verbose:
        console.print(_report_table(result))
    for line in merge_summary(result) if not State.quiet else merge_summary(result)[-1:]:
        console.print(line, highlight=False, soft_wrap=True)
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
    from rich.table import Table

    from loramerge.analysis.inspect import pairwise_overlap, summarize
    from loramerge.core.adapter import load_adapter
    from loramerge.core.names import natural_key

    try:
        loaded = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
        summaries = [summarize(a) for a in loaded]
        pairs = pairwise_overlap(loaded) if len(loaded) > 1 else []
    except LoramergeError as exc:
        fail(exc)
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
            for m in sorted(s.modules, key=lambda m: natural_key(m.name)):
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


def _method_record(m) -> dict:
    return {"name": m.name, "aliases": list(m.aliases), "kind": m.kind, "exact": m.exact, "data": m.data,
            "factorwise": m.factorwise is not None, "parameters": m.parameters(), "paper": m.paper, "url": m.url,
            "summary": m.summary}


def method_lines(width: int = 80) -> list[str]:
    """One line per registered method: name, kind, exactness, summary (cut to ``width``)."""
    from loramerge.merging.methods import REGISTRY

    lines = []
    for m in REGISTRY.values():
        tag = "exact" if m.exact else "dense" if m.kind == "elementwise" else "factored"
        line = f"{m.name:<16} {tag:<8} {m.summary}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return lines


def method_details(name: str) -> list[str]:
    """What ``loramerge methods NAME`` prints: the entry, its paper and its parameters with defaults."""
    from loramerge.merging.methods import get_method
    from loramerge.merging.methods.base import resolve

    m = get_method(name)
    fields = resolve(m.config_cls).model_fields
    lines = [f"{m.name}" + (f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""), f"  {m.summary}", "",
             f"  kind        {m.kind}" + (" (exact)" if m.exact else ""),
             f"  factorwise  {'yes: PEFT add_weighted_adapter variant (factorwise: true)' if m.factorwise else 'no'}",
             f"  data        {m.data}", f"  paper       {m.paper}", f"  url         {m.url}", "", "  parameters:"]
    if not fields:
        lines.append("    (none)")
    for field_name, f in fields.items():
        key = f.alias or field_name
        value = "(required)" if f.is_required() else repr(f.default)
        lines.append(f"    {key} = {value}" + (f"  ({f.description})" if f.description else ""))
    return lines


@app.command()
def methods(
    name: str | None = typer.Argument(None, help="A method (or alias): show its paper and parameters."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every method with its parameters)."),
) -> None:
    """List the merge methods, one line each; `loramerge methods NAME` shows one in detail."""
    from loramerge.merging.methods import REGISTRY, get_method

    try:
        if as_json:
            chosen = [get_method(name)] if name else list(REGISTRY.values())
            print(json.dumps([_method_record(m) for m in chosen], indent=2, default=str))
            return
        lines = method_details(name) if name else method_lines(max(console.width, 60))
    except LoramergeError as exc:
        fail(exc)
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not name:
        console.print("exact: lossless in factored form; factored: low-rank maths, approximate; dense: element-wise "
                      "on delta_W. Details: loramerge methods NAME", style="dim", highlight=False)


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
    except LoramergeError as exc:
        fail(exc)
    console.print(render_table(rows, f"{len(adapters)} adapters, rank policy {rank}"))
    plot = plot_rows(rows, Path(output) / "comparison.png", "loramerge compare")
    if plot:
        console.print(f"plot: {plot}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo_out"), "--workdir", "-w", help="Where the demo writes its model and adapters."),
) -> None:
    """Build a tiny model and adapters locally; merge, compare, generate, then answer routed requests."""
    from rich.console import Console

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


def run_app() -> None:
    app()


def main() -> None:
    """Kept for ``python -m loramerge.cli.app``; the console script is ``loramerge.cli.entry:main``."""
    from loramerge.cli.interrupt import run_with_interrupts

    run_with_interrupts(run_app)


if __name__ == "__main__":
    main()
