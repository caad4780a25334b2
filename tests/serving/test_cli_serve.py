"""``loramerge serve`` as a user runs it: the README's command line starts and serves; a base model that is
missing or unusable, a bad option or engine options without vLLM end with the project's error format and
exit code, no traceback, and no composition directory left in the temporary directory."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loramerge.cli.app import app

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_serve_command() -> str:
    """The README's `loramerge serve` line (continuation joined), optional [..] parts as shown in brackets."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("loramerge serve "))
    text = lines[start]
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + " " + lines[start].strip()
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_command_starts_and_serves(serving_base, adapter_root, tmp_path):
    command = readme_serve_command()
    assert "--adapters code=adapters/code math=adapters/math" in command  # several pairs after one --adapters
    # the bracketed options are optional: keep them as written where they apply to this setup
    command = command.replace("[--adapter-root DIR] ", "").replace("[--router router/] ", "")
    command = command.replace("[--max-lora-rank 64]", "--max-lora-rank 64")
    port = free_port()
    argv = [Path(sys.executable).parent / "loramerge", *shlex.split(command)[1:]]
    argv = [str(a).replace("BASE", str(serving_base[1])).replace("8000", str(port)) for a in argv]
    (tmp_path / "adapters").mkdir()
    for name in ("code", "math"):
        (tmp_path / "adapters" / name).symlink_to(adapter_root / name)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*argv, "--backend", "peft"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        r = httpx.post(url + "/v1/completions", json={"model": "mix:code=0.7,math=0.3", "prompt": "one two",
                                                      "max_tokens": 2, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["composition"]["label"] == "mix:code=0.7,math=0.3"
        assert {"code", "math"} <= {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not list(tmp_path.glob("loramerge-compositions-*"))  # the temporary cache is removed at exit


@pytest.fixture()
def isolated_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def run(*args):
    return CliRunner().invoke(app, ["serve", *map(str, args)])


@pytest.mark.parametrize("case, code, needles", [
    ("missing", 8, ["BaseModelError", "does not exist", "fix:"]),
    ("no-config", 8, ["BaseModelError", "no config.json"]),
    ("broken", 8, ["BaseModelError", "could not load the base model", "fix:"]),
    ("backend", 2, ["--backend 'pef' is not one of auto, vllm, peft"]),
    ("engine-arg", 2, ["vLLM", "fix:"]),
    ("pair", 2, ["cannot read --adapters 'code'"]),
])
def test_failed_starts_say_why_and_leave_nothing(serving_base, adapter_root, tmp_path, isolated_tmp, case, code,
                                                 needles):
    base = serving_base[1]
    extra: list = ["--backend", "peft", "--adapters", f"code={adapter_root / 'code'}"]
    if case == "missing":
        base = tmp_path / "no-such-model"
    elif case == "no-config":
        base = tmp_path / "empty"
        base.mkdir()
    elif case == "broken":
        base = tmp_path / "broken"
        base.mkdir()
        (base / "config.json").write_text("{}")
    elif case == "backend":
        extra = ["--backend", "pef"]
    elif case == "engine-arg":
        extra = ["--backend", "peft", "--engine-arg", "tensor_parallel_size=2"]
    elif case == "pair":
        extra = ["--adapters", "code"]
    result = run("--base", base, *extra)
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert all(n in output for n in needles), output
    assert "Traceback" not in output
    assert not list(isolated_tmp.iterdir())  # no composition directory left behind


def test_adapter_pairs_as_positional_words_and_vllm_options_after_double_dash():
    from loramerge.serving.cli import split_positional

    assert split_positional(["a=x", "b=y"]) == (["a=x", "b=y"], [])
    assert split_positional(["a=x", "--tensor-parallel-size", "2", "--enforce-eager"]) == (
        ["a=x"], ["--tensor-parallel-size", "2", "--enforce-eager"])
