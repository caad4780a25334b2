"""CLI verbs that meet the ecosystem: ``bake`` (adapter into base model) and ``push`` (to the Hub).

The main CLI mounts them: ``app.command("bake")(bake_command)`` and ``app.command("push")(push_command)``
(``app`` here also holds both, for ``app.add_typer`` or standalone use). Every ``LoramergeError`` is
printed with its file, module and fix, and the process exits with the error class's exit code.
"""

from __future__ import annotations

from pathlib import Path

import typer

from loramerge.cli.common import console, fail
from loramerge.errors import LoramergeError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Bake adapters into base models; push to the Hub.")


def bake_command(
    adapter: str = typer.Argument(..., help="Adapter directory or hub id (e.g. the output of `loramerge merge`)."),
    base_model: str = typer.Argument(..., help="Base model directory or hub id (safetensors; bitsandbytes OK)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the full merged model."),
    dtype: str = typer.Option("auto", help="auto (keep the base's dtypes), float32, float16 or bfloat16."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    revision: str | None = typer.Option(None, help="Base model revision (hub ids)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled adapter_model.bin adapter."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge ADAPTER into BASE_MODEL's weights (W + B @ A) and save a full model at OUTPUT.

    Notices (a dequantized bitsandbytes base, untied embeddings) are logged as warnings.
    """
    from loramerge.io.bake import bake

    try:
        result = bake(adapter, base_model, output, dtype=dtype, force=force, revision=revision,
                      allow_pickle=allow_pickle, show_progress=not quiet)
    except LoramergeError as exc:
        fail(exc)
    console.print(f"wrote {result.output}  ({len(result.baked_modules)} weights changed, "
                  f"dtype {str(result.dtype).replace('torch.', '')})")


def push_command(
    folder: Path = typer.Argument(..., help="A merged adapter (or baked model) directory."),
    repo_id: str = typer.Argument(..., help="Hub repository id: user/name or org/name."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: str | None = typer.Option(None, help="Branch to push to (created if missing)."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    token: str | None = typer.Option(None, envvar="HF_TOKEN", help="Hub token (default: HF_TOKEN or your login)."),
) -> None:
    """Upload FOLDER to the Hub as REPO_ID, with its model card."""
    from loramerge.io.hub import push

    try:
        result = push(folder, repo_id, private=private, token=token, revision=revision, commit_message=message)
    except LoramergeError as exc:
        fail(exc)
    console.print(f"pushed {folder} to {result.repo_url}" + (f"  ({result.commit_url})" if result.commit_url else ""))


app.command("bake")(bake_command)
app.command("push")(push_command)
