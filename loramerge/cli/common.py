"""What every CLI verb file shares: the consoles and the one way a user-facing error ends a command."""

from __future__ import annotations

import math
from typing import Any, NoReturn

import typer
from rich.console import Console

from loramerge.errors import LoramergeError

console = Console()
err_console = Console(stderr=True)


def fail(exc: LoramergeError) -> NoReturn:
    """Print a user-facing error (message, file, module, fix) and exit with its class's code.

    An error caused by Ctrl-C is reported as the interruption (exit 130), never as a damaged input.
    """
    from loramerge.cli.interrupt import exit_interrupted, interrupted

    if interrupted():
        exit_interrupted()
    err_console.print(f"[bold red]error ({type(exc).__name__}):[/] {exc.render()}", highlight=False)
    raise typer.Exit(code=exc.exit_code)


def json_safe(value: Any, found: list[str] | None = None, where: str = "$") -> Any:
    """``value`` with every NaN/Infinity replaced by null (bare NaN is not JSON); ``found`` collects their paths."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, dict):
        return {k: json_safe(v, found, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, found, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
