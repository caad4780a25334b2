"""``loramerge route train|eval`` end to end on the tiny task world (the Typer app the main CLI mounts)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loramerge.demo.toy import save_base
from loramerge.routers.cli import app

from .conftest import TASKS, labelled

runner = CliRunner()


@pytest.fixture(scope="module")
def files(task_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("route-cli")
    base = save_base(task_world.base, root / "base")
    for name, seed in (("train", 1), ("test", 2)):
        texts, tasks = labelled(20, seed=seed)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "task": y}) + "\n"
                                                    for t, y in zip(texts, tasks, strict=True)))
    adapters = [f"{t}={task_world.adapters[t]}" for t in TASKS]
    return root, base, adapters


def _run(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_route_train_and_eval_classifier_with_task_scores(files):
    root, base, adapters = files
    _run(["train", *adapters, "-o", root / "clf", "--kind", "classifier", "--data", root / "train.jsonl",
          "--base-model", base, "--layer", "1"])
    assert (root / "clf" / "router.json").is_file()
    args = ["eval", root / "clf", "--data", root / "test.jsonl", "--base-model", base, "--json", root / "clf.json"]
    for a in adapters:
        args += ["-a", a]
    output = _run(args)
    assert "routing accuracy" in output
    result = json.loads((root / "clf.json").read_text())
    assert result["accuracy"] >= 0.9 and set(result["per_task_accuracy"]) == set(TASKS)
    for task, scores in result["lm_loss"].items():
        assert scores["oracle"] < scores["uniform"], task  # the gold adapter beats the plain average
        assert scores["routed"] <= scores["uniform"], task


@pytest.mark.parametrize("kind", ["arrow", "moe"])
def test_route_train_and_eval_per_token_routers(files, kind):
    root, base, adapters = files
    extra = ["--mode", "request"] if kind == "arrow" else ["--data", root / "train.jsonl", "--base-model", base]
    _run(["train", *adapters, "-o", root / kind, "--kind", kind, *extra])
    args = ["eval", root / kind, "--data", root / "test.jsonl", "--base-model", base, "--json", root / f"{kind}.json"]
    for a in adapters:
        args += ["-a", a]
    _run(args)
    assert json.loads((root / f"{kind}.json").read_text())["accuracy"] >= 0.8


def test_route_cli_errors_name_the_fix(files):
    root, base, adapters = files
    result = runner.invoke(app, ["train", *adapters, "-o", str(root / "x"), "--kind", "centroid"])
    assert result.exit_code == 2 and "--data" in result.output
    result = runner.invoke(app, ["train", *adapters, "-o", str(root / "x"), "--kind", "nope"])
    assert result.exit_code == 2 and "centroid" in result.output
    result = runner.invoke(app, ["eval", str(root), "--data", str(root / "test.jsonl")])
    assert result.exit_code == 3 and "router.json is missing" in result.output
