"""Bad-input battery, through the command line: malformed option values, unwritable side outputs, Ctrl-C.

Every case asserts the exit code, the error class printed, that the message names the option, file or
module and the fix, that no traceback escaped, and that nothing was written or left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loramerge.errors import BaseModelError, OptionError, OutputError, RecipeError

from .helpers import leftovers, tree_digest


@pytest.fixture
def cli(monkeypatch):
    """Run ``loramerge ARGS`` in-process; returns (exit code, stdout, stderr). Wide console: no wrapped names."""
    from loramerge.cli.app import app
    from loramerge.cli.common import console, err_console

    monkeypatch.setattr(err_console, "width", 2000)
    monkeypatch.setattr(console, "width", 2000)

    def run(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"traceback escaped: {result.exception!r}") from result.exception
        return result.exit_code, result.stdout, result.stderr

    return run


def assert_cli_error(outcome, cls, *mentions: str, fix: str) -> None:
    code, _, err = outcome
    assert code == cls.exit_code, f"exit {code}, expected {cls.exit_code}: {err}"
    assert f"error ({cls.__name__})" in err, err
    assert "Traceback" not in err
    fix_line = err.split("fix: ", 1)[1] if "fix: " in err else ""
    assert fix.lower() in fix_line.lower(), f"fix {fix!r} not in: {err}"
    for mention in mentions:
        assert mention in err, f"{mention!r} not named in: {err}"


@pytest.fixture
def recipe(pair, tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "ties", "adapters": [str(p) for p in pair]}))
    return path


# ------------------------------------------------------------------------------------------------ option values

MERGE_OPTION_CASES = [
    ("rank-negative", ["--rank", "-3"], "--rank", "energy:0.99"),
    ("rank-zero", ["--rank", "0"], "--rank", "positive integer"),
    ("rank-word", ["--rank", "lots"], "--rank", "exact, auto, max"),
    ("rank-energy-not-a-number", ["--rank", "energy:abc"], "energy:abc", "energy:0.99"),
    ("rank-energy-empty", ["--rank", "energy:"], "--rank", "energy:0.99"),
    ("rank-energy-above-one", ["--rank", "energy:1.5"], "--rank", "energy:0.99"),
    ("device-unknown", ["--device", "tpu"], "--device 'tpu'", "cpu"),
    ("device-empty", ["--device", ""], "--device", "cpu"),
    ("device-garbage", ["--device", "cuda:x"], "--device", "cpu"),
    ("device-meta", ["--device", "meta"], "meta", "cpu"),
]


@pytest.mark.parametrize("args,mention,fix", [c[1:] for c in MERGE_OPTION_CASES], ids=[c[0] for c in MERGE_OPTION_CASES])
def test_malformed_merge_options(cli, recipe, tmp_path, args, mention, fix):
    out = tmp_path / "out"
    assert_cli_error(cli("merge", recipe, "-o", out, *args), OptionError, mention, fix=fix)
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["missing-dir", "is-a-directory"])
def test_unwritable_report_is_refused_before_the_merge(cli, recipe, tmp_path, where):
    """Found: --report to a bad path failed after the adapter was written. Now nothing is written."""
    report = tmp_path / "no" / "such" / "report.json" if where == "missing-dir" else tmp_path
    out = tmp_path / "out"
    assert_cli_error(cli("merge", recipe, "-o", out, "--report", report), OptionError,
                     str(report.parent if where == "missing-dir" else report),
                     fix="create the directory" if where == "missing-dir" else "file path")
    assert not out.exists() and not leftovers(tmp_path)


def test_report_is_written_with_the_adapter(cli, recipe, tmp_path):
    code, _, err = cli("merge", recipe, "-o", tmp_path / "out", "--report", tmp_path / "report.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "report.json").read_text())
    assert {r["name"] for r in rows} == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


COMPARE_OPTION_CASES = [
    ("params-invalid-json", ["--params", '{"ties": '], "not valid JSON", "JSON object"),
    ("params-a-list", ["--params", "[1, 2]"], "got list", "JSON object"),
    ("params-method-not-an-object", ["--params", '{"ties": 5}'], "'ties'", "JSON object"),
    ("params-a-string", ["--params", '"ties"'], "got str", "JSON object"),
    ("rank-word", ["--rank", "banana"], "--rank 'banana'", "exact, auto, max"),
    ("weights-not-numbers", ["--weights", "1,x"], "--weights", "0.7,0.3"),
    ("weights-nan", ["--weights", "nan,1"], "NaN", "finite"),
    ("weights-count", ["--weights", "1,2,3"], "3 weights for 2 adapters", "one weight per adapter"),
]


@pytest.mark.parametrize("args,mention,fix", [c[1:] for c in COMPARE_OPTION_CASES],
                         ids=[c[0] for c in COMPARE_OPTION_CASES])
def test_malformed_compare_options(cli, pair, tmp_path, args, mention, fix):
    out = tmp_path / "cmp"
    assert_cli_error(cli("compare", *pair, "-o", out, "--methods", "ties", *args), OptionError, mention, fix=fix)
    assert not out.exists()


def test_osrm_base_model_that_does_not_exist(cli, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    missing = tmp_path / "no-such-model"
    assert_cli_error(cli("osrm", "init", missing, "--other", f"x={texts}", "-o", tmp_path / "init"), BaseModelError,
                     str(missing), fix="save_pretrained")
    assert not (tmp_path / "init").exists()


def test_osrm_base_model_without_config_in_python(tmp_path):
    from loramerge.training.osrm import compute_osrm_init

    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError) as info:
        compute_osrm_init(tmp_path / "empty", {"x": ["hello"]}, r=2)
    assert str(tmp_path / "empty") in str(info.value) and info.value.fix


def test_serve_unknown_backend(tmp_path):
    from loramerge.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--base", str(tmp_path), "--backend", "tensorrt"])
    assert result.exit_code == OptionError.exit_code, result.output
    assert "--backend 'tensorrt'" in result.stderr and "fix: use --backend" in result.stderr


# ------------------------------------------------------------------------------------------------ recipes via the CLI


@pytest.mark.parametrize("text,mention", [
    ("method: ties\nadapters: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper"),
    ("method: ties\nadapters:\n" + "- " * 5000 + "a\n", "nested deeper"),
    ("method: ties\nadapters:\n" + "- some/adapter\n" * 300_000, "at most"),
], ids=["flow-nesting", "block-nesting", "huge-file"])
def test_pathological_recipes_exit_2(cli, tmp_path, text, mention):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert_cli_error(cli("merge", path, "-o", tmp_path / "out"), RecipeError, str(path), mention, fix="")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ inspect --json


def test_inspect_json_is_valid_json_with_nonfinite_statistics(cli, pair, monkeypatch):
    """Statistics that come out NaN/Inf (an overflowing spectrum) print as null plus a flag, never bare NaN."""
    import loramerge.analysis.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "spectrum_stats", lambda S: (float("inf"), float("nan"), 1.0))
    code, out, err = cli("inspect", *pair, "--json")
    assert code == 0, err
    body = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON output"))
    module = body["adapters"][0]["modules"][0]
    assert module["norm"] is None and module["effective_rank"] is None and module["stable_rank"] == 1.0
    assert "$.adapters[0].modules[0].norm" in body["non_finite"]
    assert "$.adapters[0].modules[0].effective_rank" in body["non_finite"]


# ------------------------------------------------------------------------------------------------ compare --force


def test_compare_does_not_replace_earlier_files_without_force(cli, pair, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = cli("compare", *pair, "-o", out, "--methods", "ties")
    assert code == 0, err
    before = tree_digest(out)
    assert_cli_error(cli("compare", *pair, "-o", out, "--methods", "ties"), OutputError, str(out), "ties",
                     fix="--force")
    assert tree_digest(out) == before and not leftovers(out)
    code, _, err = cli("compare", *pair, "-o", out, "--methods", "ties", "--force")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ Ctrl-C

_SLOW = """
import sys, time
import loramerge.io.writer as writer
import loramerge.merging.engine as engine
phase = sys.argv.pop(1)
if phase == "merge":
    def slow(*a, **k):
        print("READY", flush=True); time.sleep(60)
    engine.run_merge = slow
else:
    real = writer.save_tensors
    def slow(tensors, path, **k):
        real(tensors, path, **k); print("READY", flush=True); time.sleep(60)
    writer.save_tensors = slow
sys.argv = ["loramerge", *sys.argv[1:]]
from loramerge.cli.entry import main
main()
"""


@pytest.mark.parametrize("phase", ["write"])  # "merge" (mid-computation) works too; one subprocess keeps CI short
def test_ctrl_c_exits_130_with_one_clear_line(recipe, tmp_path, phase):
    """A real SIGINT after the weights were written into the temporary directory, before the rename."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, phase, "merge", str(recipe), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        for line in iter(proc.stdout.readline, ""):  # the progress display may print first
            if line.strip() == "READY":
                break
        else:
            pytest.fail(f"the command ended before the interruption point: {proc.communicate(timeout=60)}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: nothing was written" in err and "Traceback" not in err and "damaged" not in err, err
    assert not out.exists() and not leftovers(tmp_path)


def test_error_raised_by_an_interruption_is_reported_as_the_interruption(monkeypatch, capsys):
    """An interrupted read surfaces as a load error; once SIGINT was seen, it is reported as the interruption."""
    from loramerge.cli import interrupt
    from loramerge.cli.common import fail
    from loramerge.errors import AdapterLoadError

    monkeypatch.setattr(interrupt, "_INTERRUPTED", type(interrupt._INTERRUPTED)())
    interrupt._INTERRUPTED.set()
    with pytest.raises(SystemExit) as info:
        fail(AdapterLoadError("weight file is damaged: Interrupted system call", path="x", fix="re-download"))
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    signal.signal(signal.SIGINT, signal.default_int_handler)
