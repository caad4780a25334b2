"""The README's main command runs end to end: train, merge with several methods, compare, generate, route."""

from __future__ import annotations

from rich.console import Console
from typer.testing import CliRunner

import loramerge.cli.app
from loramerge.cli.app import app


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(loramerge.cli.app, "console", Console(width=200))
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("task_arithmetic (rank exact)", "ties (density=0.3)", "factorwise/PEFT", "generating with the best",
                     "routed requests", "routed to"):
        assert expected in out
    assert (tmp_path / "comparison.png").is_file()
    merged = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert len(merged) == 9 and all((tmp_path / "merged" / m / "adapter_config.json").is_file() for m in merged)
