"""Bad-input battery: output paths and failures while writing (nothing lost, nothing left behind)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramerge import load_adapter, merge
from loramerge.errors import (
    NumericalError,
    OutputError,
)

from .helpers import (
    CONFIG,
    Q0,
    WEIGHTS,
    _fail_on,
    _merge,
    assert_user_error,
    edit_tensors,
    leftovers,
    merged_delta,
    tree_digest,
)

# ------------------------------------------------------------------------------------------------ output paths

def test_output_exists_without_force(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        _merge(pair, out)
    assert_user_error(info.value, OutputError, str(out), fix="--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_exists_with_force_is_replaced(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = _merge(pair, out, force=True)
    assert not (out / "stale.txt").exists()
    torch.testing.assert_close(load_adapter(out).factors(Q0).delta().double(), merged_delta(result, Q0))
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_output_is_a_file(pair, tmp_path, force):
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(OutputError) as info:
        _merge(pair, out, force=force)
    assert_user_error(info.value, OutputError, str(out), fix="directory path")
    assert out.read_text() == "not a directory"


def test_output_parent_unwritable(pair, tmp_path, monkeypatch):
    """Root ignores mode bits, so the permission check is simulated at os.access."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(OutputError) as info:
        _merge(pair, locked / "sub" / "out")
    assert_user_error(info.value, OutputError, str(locked), fix="writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_overlapping_an_input(adapter_factory, tmp_path, where):
    victim = Path(shutil.copytree(adapter_factory(r=4), tmp_path / "inputs" / "a"))
    other = adapter_factory(r=4)
    out = {"inside": victim / "merged", "same": victim, "parent": victim.parent}[where]
    before = tree_digest(victim)
    with pytest.raises(OutputError) as info:
        merge(adapters=[victim, other], method="task_arithmetic", output=out, force=True)
    assert_user_error(info.value, OutputError, str(out.resolve()), str(victim.resolve()), fix="outside")
    assert tree_digest(victim) == before

WRITE_FAILURES = [
    ("disk-full-in-weights", "save_file", OSError(errno.ENOSPC, "No space left on device")),
    ("disk-full-in-config", "write_text", OSError(errno.ENOSPC, "No space left on device")),
    ("interrupt-in-card", "write_text", KeyboardInterrupt()),
    ("interrupt-in-weights", "save_file", KeyboardInterrupt()),
]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("where,exc", [c[1:] for c in WRITE_FAILURES], ids=[c[0] for c in WRITE_FAILURES])
def test_failure_mid_write_changes_nothing(pair, tmp_path, monkeypatch, where, exc, existing):
    import safetensors.torch

    out = tmp_path / "out"
    if existing:
        _merge(pair, out)
    before = tree_digest(*pair, *([out] if existing else []))
    if where == "save_file":
        _fail_on(monkeypatch, safetensors.torch, "save_file", exc)
    else:
        _fail_on(monkeypatch, Path, "write_text", exc,
                 when=lambda self, *a, **k: self.name == ("README.md" if isinstance(exc, KeyboardInterrupt)
                                                          else CONFIG))
    with pytest.raises((OutputError, KeyboardInterrupt)) as info:
        _merge(pair, out, force=True)
    if isinstance(exc, OSError):
        assert_user_error(info.value, OutputError, str(out), "No space left", fix="disk space")
    else:
        assert type(info.value) is KeyboardInterrupt
    assert tree_digest(*pair, *([out] if existing else [])) == before
    assert out.exists() == existing
    assert not leftovers(tmp_path)


def test_failure_while_swapping_in_restores_the_previous_output(pair, tmp_path, monkeypatch):
    """The rename of the new output fails after the old one was moved aside: the old one comes back."""
    out = tmp_path / "out"
    _merge(pair, out)
    before = tree_digest(out)
    _fail_on(monkeypatch, os, "replace", OSError(errno.EIO, "I/O error"),
             when=lambda src, dst: ".tmp-" in Path(src).name)
    with pytest.raises(OutputError) as info:
        _merge(pair, out, force=True)
    assert_user_error(info.value, OutputError, str(out), "I/O error", fix="nothing was changed")
    assert tree_digest(out) == before
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ a real full disk
# Found: on a real full filesystem safetensors raises its own SafetensorError (not OSError), so merge and bake
# exited 1 with a traceback. Here the filesystem limit is real: a file-size rlimit (write() fails with EFBIG)
# in a subprocess, and a small tmpfs filled up (ENOSPC) where this machine lets us mount one.

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
from loramerge.cli.entry import main
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["loramerge", *sys.argv[1:]]
main()
"""


def _run_limited(limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})


@pytest.fixture(scope="module")
def limited_inputs(adapter_factory, llama, tmp_path_factory) -> dict[str, Path]:
    from loramerge.demo.toy import save_base

    root = tmp_path_factory.mktemp("limited")
    a, b = adapter_factory(r=4, target_modules=["q_proj"]), adapter_factory(r=4, target_modules=["q_proj"])
    recipe = root / "recipe.yaml"
    recipe.write_text(f"method: ties\nadapters: [{a}, {b}]\n")
    return {"a": a, "b": b, "recipe": recipe, "base": save_base(llama, root / "base")}


FULL_DISK_COMMANDS = {
    "merge": lambda i, out: ["merge", i["recipe"], "-o", out],
    "bake": lambda i, out: ["bake", i["a"], i["base"], "-o", out, "-q"],
    "basis": lambda i, out: ["basis", "build", i["a"], i["b"], "-k", "1", "-o", out],
    "twin": lambda i, out: ["twin", "build", i["a"], i["b"], "-o", out],
}


@pytest.mark.parametrize("command", list(FULL_DISK_COMMANDS))
def test_file_size_limit_is_an_output_error(limited_inputs, tmp_path, command):
    out = tmp_path / "out"
    before = tree_digest(limited_inputs["a"], limited_inputs["b"])
    done = _run_limited(1500, *FULL_DISK_COMMANDS[command](limited_inputs, out))
    assert done.returncode == OutputError.exit_code, done.stderr[-3000:]
    assert "error (OutputError)" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr and str(out) in done.stderr and "disk space" in done.stderr
    assert not out.exists() and not leftovers(tmp_path)
    assert tree_digest(limited_inputs["a"], limited_inputs["b"]) == before


def _mount_small_tmpfs(where: Path) -> bool:
    where.mkdir()
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_full_filesystem_is_an_output_error(pair, tmp_path):
    """ENOSPC from a small tmpfs filled to ~3 KiB free (root with mount rights); elsewhere the same write path
    meets a real file-size limit instead (EFBIG), so the class is always exercised on a real filesystem."""
    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk):
        done = _run_limited(1500, "merge", _recipe_for(pair, tmp_path), "-o", disk / "out")
        assert done.returncode == OutputError.exit_code and "File too large" in done.stderr, done.stderr[-3000:]
        assert not (disk / "out").exists() and not leftovers(disk)
        return
    try:
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - 3 * 1024, 0))
        with pytest.raises(OutputError) as info:
            _merge(pair, disk / "out")
        assert_user_error(info.value, OutputError, str(disk / "out"), "No space left", fix="disk space")
        assert not (disk / "out").exists() and not leftovers(disk)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _recipe_for(pair, tmp_path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: task_arithmetic\nadapters: [{pair[0]}, {pair[1]}]\n")
    return recipe


def test_safetensors_error_while_writing_maps_to_output_error(pair, tmp_path, monkeypatch):
    """The exact exception safetensors raises (its own class, with the OS error inside) maps to OutputError."""
    import safetensors.torch
    from safetensors import SafetensorError

    _fail_on(monkeypatch, safetensors.torch, "save_file",
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(OutputError) as info:
        _merge(pair, tmp_path / "out")
    assert_user_error(info.value, OutputError, str(tmp_path / "out"), "No space left on device", fix="disk space")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ non-finite outputs
# Found: the finite check ran before the cast to the output dtype, so a float16 merge whose values overflow
# float16 wrote Inf with exit 0 (also bake --dtype float16, and compositions). Now checked as written.


def _scaled(adapter: Path, tmp_path: Path, factor: float) -> Path:
    out = Path(shutil.copytree(adapter, tmp_path / f"scaled-{factor:g}"))
    edit_tensors(out, lambda t: [t[k].mul_(factor) for k in t if "lora_B" in k])
    return out


def test_float16_overflow_of_a_merged_delta_is_a_numerical_error(pair, tmp_path):
    big = _scaled(pair[0], tmp_path, 1e7)  # a delta of ~1e5: beyond float16's 65504
    with pytest.raises(NumericalError) as info:
        merge(adapters=[big, pair[1]], method="task_arithmetic", dtype="float16", output=tmp_path / "out")
    assert_user_error(info.value, NumericalError, Q0, "float16", str(tmp_path / "out"), fix="dtype: float32")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    kept = merge(adapters=[big, pair[1]], method="task_arithmetic", dtype="bfloat16", output=tmp_path / "bf16")
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "bf16" / WEIGHTS)).values())
    assert kept.output is not None


def test_float16_factors_are_rebalanced_when_only_one_factor_overflows(pair, tmp_path):
    """A weight folded into B can push B alone past 65504 while B @ A fits: the factors are rebalanced, exactly."""
    result = merge(adapters=pair, method="task_arithmetic", weights=[2e5, 1e-3], dtype="float16",
                   output=tmp_path / "out", rank="exact")
    written = load_adapter(tmp_path / "out").factors(Q0)
    assert torch.isfinite(written.A).all() and torch.isfinite(written.B).all()
    expected = merged_delta(result, Q0)
    torch.testing.assert_close(written.delta().double(), expected, rtol=5e-3, atol=5e-3 * float(expected.abs().max()))


def test_bake_float16_overflow_is_a_numerical_error(adapter_factory, llama, tmp_path):
    from loramerge.demo.toy import save_base
    from loramerge.io.bake import bake

    base = save_base(llama, tmp_path / "base")
    big = _scaled(adapter_factory(r=4, target_modules=["q_proj"]), tmp_path, 1e7)
    before = tree_digest(base, big)
    with pytest.raises(NumericalError) as info:
        bake(big, base, tmp_path / "baked", dtype="float16")
    assert_user_error(info.value, NumericalError, "q_proj", "float16", fix="dtype: float32")
    assert not (tmp_path / "baked").exists() and not leftovers(tmp_path)
    assert tree_digest(base, big) == before


def test_twin_compose_with_huge_weights_is_a_numerical_error(pair, tmp_path):
    from loramerge.artifacts.twin import build_twin, write_composed

    bundle = build_twin(pair, tmp_path / "bundle")
    names = [t["name"] for t in bundle.manifest["tasks"]]
    with pytest.raises(NumericalError) as info:
        write_composed(tmp_path / "bundle", {names[0]: 1e9}, tmp_path / "composed", dtype="float16")
    assert_user_error(info.value, NumericalError, "float16", fix="dtype: float32")
    assert not (tmp_path / "composed").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "magnitude_prune"])
def test_dense_merge_overflow_names_the_recipe_entry(pair, tmp_path, method):
    """Found: a huge weight made the rank reduction's SVD fail with a linear-algebra traceback."""
    with pytest.raises(NumericalError) as info:
        merge(adapters=[{"path": str(pair[0]), "name": "huge"}, {"path": str(pair[1]), "name": "fine"}],
              method=method, weights=[3e38, 1.0], output=tmp_path / "out")
    assert_user_error(info.value, NumericalError, Q0, "'huge'", fix="lower the weight of 'huge'")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ permissions


def test_output_directory_mode_follows_the_umask_like_peft(pair, tmp_path):
    """Found: outputs were created 0700 (mkdtemp) where PEFT's save_pretrained gives 0777 minus the umask."""
    old = os.umask(0o022)
    try:
        _merge(pair, tmp_path / "out")
        os.makedirs(tmp_path / "peft-like")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "peft-like").stat().st_mode & 0o777 == 0o755


def test_output_parent_is_a_file(pair, tmp_path):
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(OutputError) as info:
        _merge(pair, tmp_path / "plain" / "out")
    assert_user_error(info.value, OutputError, str(tmp_path / "plain"), fix="")
    assert (tmp_path / "plain").read_text() == "a file" and not leftovers(tmp_path)
