"""What every CLI verb file shares: the consoles and the one way a user-facing error ends a command."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

from loramerge.errors import LoramergeError

console = Console()
err_console = Console(stderr=True)


def fail(exc: LoramergeError) -> NoReturn:
    """Print a user-facing error (message, file, module, fix) and exit with its class's code."""
    err_console.print(f"[bold red]error ({type(exc).__name__}):[/] {exc.render()}", highlight=False)
    raise typer.Exit(code=exc.exit_code)
