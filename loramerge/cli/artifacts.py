"""CLI verbs over the merge artifacts: ``basis build|extract`` (RMM) and ``twin build|compose`` (Twin-Merging).

Two Typer apps, mounted by the main command as ``loramerge basis ...`` and ``loramerge twin ...``.
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.table import Table

from loramerge.cli.common import console, fail
from loramerge.core.names import parse_pairs
from loramerge.errors import LoramergeError

basis_app = typer.Typer(name="basis", no_args_is_help=True, add_completion=False,
                        help="Reversible basis merging (RMM): k basis factor sets + per-task coefficients.")
twin_app = typer.Typer(name="twin", no_args_is_help=True, add_completion=False,
                       help="Twin-Merging bundles: a shared adapter + each task's compressed residual.")


@basis_app.command("build")
def basis_build(
    adapters: list[str] = typer.Argument(..., help="Task adapter directories (or hub ids)."),
    k: int = typer.Option(..., "-k", "--k", help="Basis size (1 <= k <= number of adapters; k = N is exact)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the basis artifact."),
    granularity: str = typer.Option("module", help="'module': one basis per factor; 'row': one per row (more exact)."),
    center: bool = typer.Option(False, "--center/--no-center", help="Remove the mean task before the PCA."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Build a reversible basis over ADAPTERS and write it to OUTPUT."""
    from loramerge.artifacts.basis import build_basis

    try:
        artifact = build_basis(adapters, k, output, granularity=granularity, center=center,  # type: ignore[arg-type]
                               force=force, show_progress=True)
    except LoramergeError as exc:
        fail(exc)
    manifest = artifact.manifest
    table = Table(title=f"basis k={manifest['k']} ({manifest['granularity']}) over {len(manifest['tasks'])} tasks")
    for col in ("task", "rel. error of delta_W", "worst module"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in manifest["tasks"]:
        table.add_row(task["name"], f"{task['rel_error']:.2e}", f"{task['max_module_rel_error']:.2e}")
    console.print(table)
    console.print(f"wrote {artifact.path}  (storage ratio {manifest['storage']['storage_ratio']:.3f} "
                  "of the task adapters' factors)")


@basis_app.command("extract")
def basis_extract(
    basis_dir: Path = typer.Argument(..., help="A basis directory written by `basis build`."),
    task: str = typer.Option(..., "--task", "-t", help="The task to rebuild (its adapter's name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the rebuilt PEFT adapter."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dtype: str | None = typer.Option(None, help="Output dtype (default: the task adapter's)."),
) -> None:
    """Rebuild one task's adapter from BASIS_DIR as a PEFT adapter."""
    from loramerge.artifacts.basis import extract_task

    try:
        out = extract_task(basis_dir, task, output, force=force, dtype=dtype)
    except LoramergeError as exc:
        fail(exc)
    console.print(f"wrote {out}")


def _parse_params(items: list[str]) -> dict:
    """``--param key=value`` (repeatable; values read as YAML scalars) -> {key: value}."""
    pairs = parse_pairs(items, option="--param", value="VALUE", check=False)
    return {key: yaml.safe_load(value) for key, value in pairs.items()}


@twin_app.command("build")
def twin_build(
    adapters: list[str] = typer.Argument(..., help="Task adapter directories (or hub ids)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the twin bundle."),
    shared_method: str = typer.Option("task_arithmetic", help="Registry method for the shared adapter."),
    lambda_: float | None = typer.Option(None, "--lambda",
                                            help="The shared merge's lambda (default 0.3 for task_arithmetic)."),
    param: list[str] = typer.Option([], "--param", help="Other shared-method parameters, key=value (repeatable)."),
    residual_rank: int | None = typer.Option(None, help="Rank kept per residual (default 8)."),
    residual_fraction: float | None = typer.Option(None, help="Fraction of each residual's rank kept (1.0 = exact)."),
    seed: int = typer.Option(0, help="Seed for stochastic shared methods."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Build a Twin-Merging bundle over ADAPTERS and write it to OUTPUT."""
    from loramerge.artifacts.twin import build_twin

    try:
        params = _parse_params(param)
        if lambda_ is not None:
            params["lambda"] = lambda_
        elif shared_method in ("task_arithmetic", "linear") and "lambda" not in params:
            params["lambda"] = 0.3
        bundle = build_twin(adapters, output, shared_method=shared_method, shared_parameters=params,
                            residual_rank=residual_rank, residual_fraction=residual_fraction, seed=seed,
                            force=force, show_progress=True)
    except LoramergeError as exc:
        fail(exc)
    manifest = bundle.manifest
    table = Table(title=f"twin bundle: shared {manifest['shared']['method']} (total rank "
                        f"{manifest['shared']['total_rank']}), residual {manifest['residual']}")
    for col in ("task", "residual total rank", "truncation rel. error"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in manifest["tasks"]:
        table.add_row(task["name"], str(task["residual_total_rank"]), f"{task['residual_rel_error']:.2e}")
    console.print(table)
    console.print(f"wrote {bundle.path}")


@twin_app.command("compose")
def twin_compose(
    bundle_dir: Path = typer.Argument(..., help="A bundle directory written by `twin build`."),
    weights: str = typer.Option(..., "--weights", "-w", help="Task weights: name=0.7,other=0.3 (others are 0)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the composed PEFT adapter."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dtype: str | None = typer.Option(None, help="Output dtype (default: the bundle's)."),
) -> None:
    """Write shared + sum_t w_t residual_t of BUNDLE_DIR as one exact PEFT adapter."""
    from loramerge.artifacts.twin import parse_weights, write_composed

    try:
        out = write_composed(bundle_dir, parse_weights(weights), output, force=force, dtype=dtype)
    except LoramergeError as exc:
        fail(exc)
    console.print(f"wrote {out}")


__all__ = ["basis_app", "twin_app"]
