"""``loramerge route train|eval`` end to end on the tiny task world (the Typer app the main CLI mounts)."""

from __future__ import annotations

import json

import pytest
import torch
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


def test_every_format_of_the_one_data_reader_trains_the_same_router(files, tmp_path):
    """One file with tasks, a file per adapter (NAME=FILE, no task field) and multiple-choice lines (routed on
    the prompt) give the same centroid router: the formats `calibrate` and `tune` read work for `route train`."""
    root, base, adapters = files
    texts, tasks = labelled(20, seed=1)
    per_task = {t: [x for x, y in zip(texts, tasks, strict=True) if y == t] for t in TASKS}
    specs = []
    for t, rows in per_task.items():
        (tmp_path / f"{t}.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in rows))
        specs += ["--data", f"{t}={tmp_path / f'{t}.jsonl'}"]
    (tmp_path / "choice.jsonl").write_text("".join(
        json.dumps({"task": y, "prompt": x, "options": ["yes", "no"], "label": 0}) + "\n"
        for x, y in zip(texts, tasks, strict=True)))
    common = [*adapters, "--kind", "centroid", "--base-model", base, "--layer", "1"]
    _run(["train", *common, "-o", tmp_path / "one", "--data", root / "train.jsonl"])
    _run(["train", *common, "-o", tmp_path / "per", *specs])
    _run(["train", *common, "-o", tmp_path / "choice", "--data", tmp_path / "choice.jsonl"])
    from safetensors.torch import load_file

    reference = load_file(tmp_path / "one" / "router.safetensors")
    for other in ("per", "choice"):
        tensors = load_file(tmp_path / other / "router.safetensors")
        assert set(tensors) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(tensors[key], value, msg=f"{other}: {key}")


def test_route_train_takes_each_kinds_defaults_from_its_class_and_refuses_others(files):
    from loramerge.routers.cli import KINDS, build_router
    from loramerge.routers.registry import TRAINABLE_KINDS, router_options
    from loramerge.routers.similarity import CentroidOptions, CentroidRouter

    assert KINDS == TRAINABLE_KINDS
    listing = runner.invoke(app, ["kinds"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "--budget 40" in listing.output and "--top-k 1, --temperature 0.1" in listing.output
    assert router_options("centroid", {"top_k": None}) == CentroidOptions()
    assert router_options("arrow", {"top_k": 2, "mode": "request"}).top_k == 2
    root, base, adapters = files
    router = build_router(adapters, kind="centroid", data=root / "train.jsonl", base_model=base, layer=1)
    assert isinstance(router, CentroidRouter)
    assert (router.top_k, router.temperature) == (CentroidOptions.top_k, CentroidOptions.temperature)
    result = runner.invoke(app, ["train", *adapters, "-o", str(root / "x"), "--kind", "centroid", "--budget", "5",
                                 "--data", str(root / "train.jsonl")])
    assert result.exit_code == 2 and "--budget does not apply to a centroid router" in result.output
    assert not (root / "x").exists()
    result = runner.invoke(app, ["train", f"a={adapters[0].partition('=')[2]}", f"a={adapters[1].partition('=')[2]}",
                                 "-o", str(root / "x"), "--kind", "arrow"])
    assert result.exit_code == 2 and "'a' is given twice" in result.output
