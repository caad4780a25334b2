"""CLI verbs for the training-time methods: ``osrm init`` (OSRM's A from the other tasks' inputs) and
``lori masks|verify`` (LoRI's masks from a dense run; A regenerated from lori.json). Training is Python-only."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loramerge.cli.common import console, fail
from loramerge.cli.options import check_local_model_dir
from loramerge.core.names import parse_pairs
from loramerge.errors import LoramergeError, OutputError

osrm_app = typer.Typer(name="osrm", no_args_is_help=True, add_completion=False,
                       help="OSRM: LoRA A orthogonal to the other tasks' input features (set before training).")
lori_app = typer.Typer(name="lori", no_args_is_help=True, add_completion=False,
                       help="LoRI: frozen random A, sparse B masks.")


def _parse_sources(other: list[str]) -> dict[str, str]:
    """``--other NAME=PATH`` (or a bare PATH, named after the file) -> {task: path}."""
    return parse_pairs(other, option="--other", name_optional=True, check=False)


@osrm_app.command("init")
def osrm_init(
    base: Path = typer.Argument(..., help="Local base model directory (with its tokenizer)."),
    other: list[str] = typer.Option(..., "--other", help="NAME=PATH of another task's texts (.txt, .jsonl or a "
                                                          "saved dataset dir); repeat for every other task."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the init (or an existing adapter dir)."),
    r: int = typer.Option(8, "-r", "--rank", help="LoRA rank."),
    targets: str = typer.Option("q_proj,v_proj", help="Comma-separated target module names."),
    mode: str = typer.Option("covariance", help="'covariance' (the paper) or 'mean_nullspace' (the authors' code)."),
    center: bool = typer.Option(False, "--center/--no-center", help="Centre the covariance (covariance mode)."),
    text_field: str = typer.Option("text", help="Text field of .jsonl records / dataset column."),
    max_samples: int = typer.Option(512, help="At most this many texts per task."),
    batch_size: int = typer.Option(8, help="Texts per forward pass."),
    max_length: int = typer.Option(128, help="Truncate texts to this many tokens."),
    force: bool = typer.Option(False, "--force", help="Replace an existing init."),
) -> None:
    """Compute OSRM's A for every target module of BASE from the other tasks' texts; write it to OUTPUT."""
    from loramerge.training.osrm import compute_osrm_init

    try:
        check_local_model_dir(base, "BASE")
        init = compute_osrm_init(base, _parse_sources(other), r=r, mode=mode,  # type: ignore[arg-type]
                                 target_modules=[t.strip() for t in targets.split(",") if t.strip()], center=center,
                                 text_field=text_field, max_samples=max_samples, batch_size=batch_size,
                                 max_length=max_length)
        path = init.save(output, force=force)
    except LoramergeError as exc:
        fail(exc)
    table = Table(title=f"OSRM ({init.mode}) r={init.r} from {sum(init.tasks.values())} texts, {init.tokens} tokens")
    table.add_column("module")
    table.add_column("energy vs random subspace", justify="right")
    for name, ratio in sorted(init.energy_ratio.items()):
        table.add_row(name, f"{ratio:.2e}")
    console.print(table)
    console.print(f"wrote {path}  (train with loramerge.training.osrm.prepare_osrm_model(base, '{path}', freeze_A=True))")


@lori_app.command("masks")
def lori_masks(
    adapter: Path = typer.Argument(..., help="A dense (LoRI-D) adapter directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Mask file to write (.safetensors)."),
    sparsity: float = typer.Option(0.9, help="Fraction of B entries to zero (0.9 keeps the top 10%)."),
    scope: str = typer.Option("global", help="'global' (one threshold over all modules, the paper's) or 'module'."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Extract LoRI's B masks from ADAPTER."""
    from loramerge.training.lori import extract_masks

    try:
        if output.exists() and not force:
            raise OutputError("the mask file exists", path=str(output), fix="choose another path, or pass --force")
        masks = extract_masks(adapter, sparsity=sparsity, scope=scope)  # type: ignore[arg-type]
        masks.save(output)
    except LoramergeError as exc:
        fail(exc)
    console.print(f"wrote {output}: kept {masks.kept()} of {masks.total()} B entries ({scope} scope)")


@lori_app.command("verify")
def lori_verify(adapter: Path = typer.Argument(..., help="A LoRI adapter directory (with lori.json).")) -> None:
    """Check that ADAPTER's A regenerates bit-exactly from lori.json; show B's sparsity per module."""
    from loramerge.training.lori import b_sparsity_of, load_lori_spec, verify_lori_adapter

    try:
        spec = load_lori_spec(adapter)
        verify_lori_adapter(adapter)
        sparsity = b_sparsity_of(adapter)
    except LoramergeError as exc:
        fail(exc)
    table = Table(title=f"LoRI adapter: A regenerated from seed {spec.seed} ({spec.a_init}): identical")
    table.add_column("module")
    table.add_column("B zeros", justify="right")
    for name, value in sorted(sparsity.items()):
        table.add_row(name, f"{value:.1%}")
    console.print(table)
