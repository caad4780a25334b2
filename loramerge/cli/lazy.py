"""Verb groups imported only when they run, so ``loramerge --help`` never imports torch.

Click's documented pattern for lazily loaded subcommands (a group whose ``get_command`` imports on
demand), on Typer's group class. ``--help`` lists a lazy verb from its one-line help, without importing it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import click
import typer
from typer.core import TyperGroup


@dataclass(frozen=True)
class LazyVerb:
    """A verb whose Typer app (a group) or command function lives at ``target`` (``"module:attribute"``)."""

    target: str
    help: str

    def load(self, name: str) -> click.Command:
        module, _, attr = self.target.partition(":")
        obj: Any = getattr(importlib.import_module(module), attr)
        if not isinstance(obj, typer.Typer):
            single = typer.Typer(add_completion=False)
            single.command(name)(obj)
            obj = single
        command = typer.main.get_command(obj)
        command.name = name
        if isinstance(command, click.Group) and not command.help:
            command.help = self.help
        return command


class LazyVerbs(TyperGroup):
    """The main command's group: eager commands as usual, plus ``lazy_verbs`` loaded by name."""

    lazy_verbs: dict[str, LazyVerb] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._listing = False
        self._loaded: dict[str, click.Command] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        eager = super().list_commands(ctx)
        return eager + [n for n in self.lazy_verbs if n not in eager]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        verb = self.lazy_verbs.get(cmd_name)
        if command is not None or verb is None:
            return command
        if self._listing:  # the help screen: name and one line, nothing imported
            return click.Command(cmd_name, help=verb.help, short_help=verb.help)
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = verb.load(cmd_name)
        return self._loaded[cmd_name]

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


__all__ = ["LazyVerb", "LazyVerbs"]
