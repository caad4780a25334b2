"""Every command README.md shows runs as written: against a demo-shaped tree (what `make demo` leaves),
the cheap ``loramerge`` commands run for real, the others must at least parse; `make` targets and
`pip install` extras must exist."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from loramerge.cli.app import app
from loramerge.demo.data import write_demo_data
from loramerge.demo.run import TASKS, write_task_data
from loramerge.demo.toy import LLAMA_TARGETS, make_adapter, save_base, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARSE_ONLY = {"serve"}
"""Verbs that start a long-running process: checked to parse, not run here (the serve line, with its
placeholders BASE and [optional] flags, is started for real by tests/serving/test_cli_serve.py)."""


def expand_braces(token: str) -> list[str]:
    """bash's brace expansion of one word: ``a/{x,y}`` -> ``a/x a/y`` (the README uses it for adapter lists)."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if match is None:
        return [token]
    head, tail = token[:match.start()], token[match.end():]
    return [word for part in match.group(1).split(",") for word in expand_braces(head + part + tail)]


def shell_commands(text: str) -> list[list[str]]:
    """Each command line of the ```bash blocks, continuation lines joined, comments dropped, braces expanded."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = [word for token in shlex.split(line, comments=True) for word in expand_braces(token)]
            if tokens:
                out.append(tokens)
    return out


COMMANDS = shell_commands(README)
SAVED_FILES = re.findall(r"Save as `([^`]+)`[^`]*?```yaml\n(.*?)```", README, flags=re.S)
"""The files the README asks the reader to save (``Save as `PATH` ... ```yaml``), written before the commands run."""
LORAMERGE = [c for c in COMMANDS if c[0] == "loramerge"]


class ParseError(Exception):
    pass


def parse(args: list[str]) -> None:
    """Parse ``loramerge ARGS`` down to the leaf command without running it; ParseError if it does not parse."""
    try:
        _parse(args)
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # click's (or typer's vendored click's) UsageError family
            raise
        raise ParseError(exc.format_message()) from None


def _parse(args: list[str]) -> None:
    command = typer.main.get_command(app)
    ctx = command.make_context("loramerge", list(args))
    while hasattr(command, "resolve_command"):
        pending = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
        name, command, rest = command.resolve_command(ctx, [*pending, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)


def test_the_readme_shows_commands():
    assert len(LORAMERGE) >= 10 and {c[1] for c in LORAMERGE} >= {"merge", "methods", "basis", "twin", "route"}
    assert shell_commands("```bash\nloramerge a \\\n  b  # c\n```") == [["loramerge", "a", "b"]]
    assert shell_commands("```bash\nloramerge x/{a,b}/y\n```") == [["loramerge", "x/a/y", "x/b/y"]]
    with pytest.raises(ParseError, match="extra"):  # the parse check can fail
        parse(["merge", "recipe.yaml", "-o", "out", "extra"])


@pytest.mark.parametrize("args", LORAMERGE, ids=lambda c: " ".join(c[1:4]))
def test_loramerge_command_lines_parse(args):
    notation = [a for a in args if a.startswith(("[", "<")) or a.isupper()]
    assert not notation or args[1] in PARSE_ONLY, f"`{' '.join(args)}` uses placeholder notation {notation}: not runnable as written"
    try:
        parse(args[1:])
    except ParseError as exc:
        pytest.fail(f"`{' '.join(args)}` does not parse: {exc}")


def test_make_targets_and_pip_extras_exist():
    makefile = (ROOT / "Makefile").read_text()
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))
    assert {"serve", "vllm", "data"} <= extras
    for args in COMMANDS:
        if args[0] == "make":
            for target in args[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target '{target}'"
        elif args[:3] == ["pip", "install", "-e"]:
            for extra in re.findall(r"\[(.*?)\]", args[3]):
                assert all(e in extras for e in extra.split(",")), f"no extra '{extra}' in pyproject.toml"


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """What `make demo` leaves (random adapters instead of trained ones), plus the examples."""
    root = tmp_path_factory.mktemp("readme")
    demo = root / "demo_out"
    base = tiny_llama(seed=0)
    save_base(base, demo / "base")
    for i, task in enumerate(TASKS):
        make_adapter(base, demo / "adapters" / task, seed=200 + i, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                     base_name="demo_out/base")  # as the demo records it (relative to the working directory)
    write_task_data(demo, n=8)
    write_demo_data(demo, n=8)  # what the README's `python -m loramerge.demo.data demo_out` writes
    shutil.copytree(ROOT / "examples", root / "examples")
    for relative, text in SAVED_FILES:
        (root / relative).write_text(text)
    return root


def test_readme_commands_run_as_written(demo_tree, monkeypatch):
    monkeypatch.chdir(demo_tree)
    runner = CliRunner()
    ran = []
    for args in LORAMERGE:
        if args[1] in PARSE_ONLY:
            continue
        result = runner.invoke(app, args[1:])
        assert result.exit_code == 0, f"`{' '.join(args)}` failed:\n{result.output}"
        ran.append(args[1])
    assert {"merge", "inspect", "methods", "compare", "basis", "twin", "route"} <= set(ran)
    assert (demo_tree / "merged" / "ties" / "adapter_config.json").is_file()
    assert (demo_tree / "router" / "router.json").is_file()
