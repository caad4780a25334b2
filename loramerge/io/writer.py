"""Write PEFT adapters safely: a temporary directory renamed into place.

A failed run leaves no half-written directory, and an existing output is only
replaced when the caller asks (``force``), after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME, ModuleKind
from loramerge.errors import OutputError


@dataclass(frozen=True)
class OutputModule:
    """One module of an adapter to write, scale already folded into B (written with scale 1)."""

    name: str
    kind: ModuleKind
    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def check_output_path(output: Path, *, force: bool, inputs: list[Path] = ()) -> Path:  # type: ignore[assignment]
    """Refuse outputs that would lose data, before any work is done."""
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise OutputError("the output path exists and is a file", path=str(output),
                          fix="choose a directory path for the merged adapter")
    if output.exists() and not force:
        raise OutputError("the output directory already exists", path=str(output),
                          fix="choose a new path, or pass --force (force=True) to replace it")
    for src in inputs:
        src = Path(src).resolve()
        if output == src or src in output.parents or output in src.parents:
            raise OutputError(f"the output would overlap the input adapter {src}", path=str(output),
                              fix="write the merged adapter outside the input adapters' directories")
    parent = output.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError("the output's parent directory is not writable", path=str(probe),
                          fix="choose a writable location or fix its permissions")
    return output


def build_lora_config(
    modules: list[OutputModule],
    *,
    base_model: str | None,
    target_modules: list[str] | str,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
) -> dict:
    """A fresh PEFT LoRA config for these modules (never cloned from an input).

    Every module is written with scale 1: ``lora_alpha = r`` for the most common
    rank, and ``rank_pattern``/``alpha_pattern`` entries (equal) for the others.
    """
    ranks = Counter(m.rank for m in modules)
    r = max(ranks.items(), key=lambda kv: (kv[1], kv[0]))[0]
    pattern = {m.name: m.rank for m in modules if m.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def tensors_for(modules: list[OutputModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for m in modules:
        prefix = PEFT_PREFIX + m.name
        a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if m.kind == "embedding" else (".lora_A.weight", ".lora_B.weight")
        out[prefix + a_key] = m.A.detach().to("cpu", dtype).contiguous()
        out[prefix + b_key] = m.B.detach().to("cpu", dtype).contiguous()
    return out


@contextlib.contextmanager
def atomic_directory(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; on success move it into place."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            if not force:
                raise OutputError("the output directory appeared while merging", path=str(output),
                                  fix="choose a new path, or pass --force")
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            backup.rmdir()
            os.replace(output, backup)
            try:
                os.replace(tmp, output)
            except BaseException:
                os.replace(backup, output)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter(
    output: Path,
    modules: list[OutputModule],
    config: dict,
    *,
    dtype: torch.dtype,
    card: str | None = None,
    extra_files: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a PEFT adapter directory atomically."""
    from safetensors.torch import save_file

    try:
        with atomic_directory(output, force=force) as tmp:
            save_file(tensors_for(modules, dtype), str(tmp / SAFETENSORS_NAME), metadata={"format": "pt", **(metadata or {})})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if card is not None:
                (tmp / "README.md").write_text(card)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    except OSError as exc:
        raise OutputError(f"could not write the adapter: {exc}", path=str(output),
                          fix="check free disk space and permissions; nothing was changed at the output path") from exc
    return Path(output)
