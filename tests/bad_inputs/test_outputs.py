"""Bad-input battery: output paths and failures while writing (nothing lost, nothing left behind)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from loramerge import load_adapter, merge
from loramerge.errors import (
    OutputError,
)

from .helpers import (
    CONFIG,
    Q0,
    _fail_on,
    _merge,
    assert_user_error,
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
