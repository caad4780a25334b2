"""Shared helpers of the bad-input battery (tests/bad_inputs): assertions, damage tools, oracles."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loramerge import load_adapter, merge
from loramerge.errors import (
    LoramergeError,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


# ------------------------------------------------------------------------------------------------ helpers


def assert_user_error(exc: BaseException, cls: type[LoramergeError], *mentions: str, fix: str = "") -> None:
    """The exact class, a fix line, and every mention (file, module, key) in the rendered message."""
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    text = str(exc)
    assert exc.fix, f"no fix in: {text}"
    assert "  fix: " in text
    assert fix.lower() in exc.fix.lower(), f"fix {exc.fix!r} lacks {fix!r}"
    for mention in mentions:
        assert mention in text, f"{mention!r} not named in: {text}"


def read_all(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Load an adapter and read every module (errors raised while reading count)."""
    adapter = load_adapter(path, **kwargs)
    return {name: adapter.factors(name).delta() for name in adapter.modules}


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (relative names), to prove nothing changed."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[f"{root.name}/{p.relative_to(root)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary or backup directories the atomic writer might have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = (path / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_with_header(path: Path, header: dict | str | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = header_of(path)
    change(header)
    write_with_header(path, header, data)


def dense_delta(path: Path, module: str) -> torch.Tensor:
    """Independent oracle: scale * B @ A read straight from the file and the config."""
    cfg = json.loads((path / CONFIG).read_text())
    t = load_file(str(path / WEIGHTS))
    A = t[f"base_model.model.{module}.lora_A.weight"].double()
    B = t[f"base_model.model.{module}.lora_B.weight"].double()
    return cfg["lora_alpha"] / cfg["r"] * B @ A


def merged_delta(result, module: str) -> torch.Tensor:
    f = result.factors()[module]
    return f.B.double() @ f.A.double()


def _fail_on(monkeypatch, target, attribute: str, exc: BaseException, when: Callable[..., bool] = lambda *a, **k: True):
    real = getattr(target, attribute)

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, failing)


def _merge(pair, output, **kwargs):
    return merge(adapters=pair, method="task_arithmetic", output=output, **kwargs)
