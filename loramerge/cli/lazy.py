"""Verb groups imported only when they run, so ``loramerge --help`` never imports torch.

Click's documented pattern for lazily loaded subcommands (a group whose ``get_command`` imports on
demand), on Typer's group class (typer's own click types: recent typer versions vendor click). ``--help`` lists a lazy verb from its one-line help, without importing it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


@dataclass(frozen=True)
class LazyVerb:
    """A verb whose Typer app (a group) or command function lives at ``target`` (``"module:attribute"``)."""

    target: str
    help: str

    def load(self, name: str) -> Any:
        module, _, attr = self.target.partition(":")
        obj: Any = getattr(importlib.import_module(module), attr)
        if not isinstance(obj, typer.Typer):
            single = typer.Typer(add_completion=False)
            single.command(name)(obj)
            command = typer.main.get_command(single)
        else:  # a verb group stays a group even with one sub-verb (`osrm init`): get_command would collapse it
            command = typer.main.get_group(obj)
        command.name = name
        if isinstance(command, TyperGroup) and not command.help:
            command.help = self.help
        return command


class LazyVerbs(TyperGroup):
    """The main command's group: eager commands as usual, plus ``lazy_verbs`` loaded by name."""

    lazy_verbs: dict[str, LazyVerb] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._listing = False
        self._loaded: dict[str, Any] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        eager = super().list_commands(ctx)
        return eager + [n for n in self.lazy_verbs if n not in eager]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        verb = self.lazy_verbs.get(cmd_name)
        if command is not None or verb is None:
            return command
        if self._listing:  # the help screen: name and one line, nothing imported
            return TyperCommand(cmd_name, help=verb.help, short_help=verb.help)
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = verb.load(cmd_name)
        return self._loaded[cmd_name]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


__all__ = ["LazyVerb", "LazyVerbs"]
