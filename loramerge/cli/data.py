"""CLI verb for the data-informed methods: ``calibrate`` (calibration statistics for regmean / fisher)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from loramerge.cli.common import console, fail
from loramerge.errors import LoramergeError


def calibrate_command(
    adapters: list[str] = typer.Argument(..., help="Adapters: name=path or path (name = directory name)."),
    data: list[str] = typer.Option(..., "--data", help="Texts: one JSONL with a 'task' per line (the adapter's "
                                   "name), or name=file per adapter (.jsonl/.txt); repeatable."),
    base_model: Path = typer.Option(..., "--base-model", help="The adapters' base model: a local transformers "
                                    "directory with its tokenizer (or a .gguf file)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the statistics (safetensors + "
                                "calibration.json)."),
    source: str = typer.Option("adapter", help="Whose activations: 'adapter' (each adapter's fine-tuned model, the "
                               "papers' choice) or 'base' (the base model's, cheaper to reason about)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Truncate texts to this many tokens (default: "
                                          "the model's context); truncations are counted and reported."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    fisher: bool = typer.Option(False, "--fisher", help="Also record Kronecker-factored diagonal-Fisher factors "
                                "(needs a backward pass; for `method: fisher`)."),
    fisher_labels: str = typer.Option("sampled", "--fisher-labels", help="Fisher's next tokens: 'sampled' from the "
                                      "model's predictions (the paper) or 'text' (the empirical Fisher)."),
    limit: int | None = typer.Option(None, "--limit", help="Use at most this many texts per adapter."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Run each adapter's model over its texts and save per-module input Grams (and Fisher factors) for
    `method: regmean` / `fisher` recipes (`calibration: OUTPUT`)."""
    from loramerge.cli.app import State
    from loramerge.data.calibration import MANIFEST, calibrate
    from loramerge.data.examples import parse_data_specs

    try:
        path = calibrate(base_model, adapters, parse_data_specs(data), output, source=source,  # type: ignore[arg-type]
                         max_length=max_length, batch_size=batch_size, fisher=fisher, limit=limit, force=force,
                         fisher_labels=fisher_labels,  # type: ignore[arg-type]
                         show_progress=not State.quiet)
    except LoramergeError as exc:
        fail(exc)
        return
    manifest = json.loads((path / MANIFEST).read_text())
    if not State.quiet:
        table = Table(title=f"calibration statistics ({manifest['source']} activations, max length "
                            f"{manifest['max_length']}) in {manifest['seconds']:.1f}s")
        for col in ("adapter", "texts", "tokens", "truncated", "sha256"):
            table.add_column(col, justify="left" if col in ("adapter", "sha256") else "right")
        for r in manifest["adapters"]:
            table.add_row(r["name"], str(r["texts"]), str(r["tokens"]), str(r["truncated"]), r["sha256"][:12])
        console.print(table)
    if manifest["truncated"]:
        console.print(f"[yellow]{manifest['truncated']} texts were longer than {manifest['max_length']} tokens "
                      "and were truncated[/]")
    console.print(f"wrote {path}  ({len(set(manifest['inputs'].values()))} module inputs per adapter"
                  f"{', with Fisher factors' if manifest['fisher'] else ''})")
