"""What `loramerge merge` prints: a short summary by default, the per-module table with --verbose, natural order."""

from __future__ import annotations

import json

import yaml
from rich.console import Console
from typer.testing import CliRunner

import loramerge.cli.app
from loramerge.cli.app import app
from loramerge.demo.toy import make_adapter, tiny_llama


def test_merge_prints_a_summary_and_the_table_only_when_verbose(tmp_path, monkeypatch):
    monkeypatch.setattr(loramerge.cli.app, "console", Console(width=80))
    base = tiny_llama(seed=0, layers=11)
    paths = [make_adapter(base, tmp_path / name, seed=i, r=4, target_modules=["q_proj"])
             for i, name in enumerate(("a", "b"))]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "adapters": [str(p) for p in paths], "rank": 4}))
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("merged 2 adapters with ties in ")
    assert "11 (rank 4, total 44)" in lines[1] and "worst error" in lines[2] and str(tmp_path / "out") in lines[3]
    assert len(lines) == 4 and "model.layers.0." not in result.output  # no per-module rows
    report = json.loads((tmp_path / "out" / "loramerge.json").read_text())["modules"]
    layers = [int(m["name"].split(".")[2]) for m in report]
    assert layers == list(range(11))  # natural order: layer 2 before layer 10
    monkeypatch.setattr(loramerge.cli.app, "console", Console(width=200))  # table rows unwrapped
    verbose = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--force", "-v"])
    assert verbose.exit_code == 0, verbose.output
    rows = [line for line in verbose.output.splitlines() if line.startswith("│") and "model.layers." in line]
    assert [int(r.split("model.layers.")[1].split(".")[0]) for r in rows] == list(range(11))
