"""Write PEFT adapters safely: a temporary directory renamed into place.

A failed run leaves no half-written directory, and an existing output is only
replaced when the caller asks (``force``), after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.core.adapter import CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME, ModuleKind
from loramerge.errors import LoramergeError, NumericalError, OutputError


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


_WRITE_FIX = "check free disk space and permissions; nothing was changed at the output path"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_finite_as_written(tensor: torch.Tensor, *, module: str, path: Path | str | None) -> None:
    """Refuse NaN/Inf in a tensor about to be written, checked in the dtype it is written in (after the cast)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        name = _dtype_name(tensor.dtype)
        raise NumericalError(
            f"the values to write are not finite in {name} (NaN or Inf; {name} holds at most "
            f"{torch.finfo(tensor.dtype).max:.4g})", path=str(path) if path else None, module=module,
            fix="use dtype: float32 or bfloat16 (float16 overflows above 65504), or lower the adapters' weights",
        )


def _balanced(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with the same product ``B @ A`` and equal largest entries, when the plain cast would overflow
    ``dtype`` only because the magnitude sits in one factor (e.g. a merge weight of 1e4 folded into B)."""
    limit = torch.finfo(dtype).max
    a_max = float(A.abs().amax()) if A.numel() else 0.0
    b_max = float(B.abs().amax()) if B.numel() else 0.0
    if max(a_max, b_max) <= limit or a_max == 0.0 or b_max == 0.0 or not math.isfinite(a_max * b_max):
        return A, B
    c = (b_max / a_max) ** 0.5
    return A * c, B / c


def tensors_for(modules: list[OutputModule], dtype: torch.dtype, path: Path | str | None = None) -> dict[str, torch.Tensor]:
    """The PEFT tensors in ``dtype``; every value checked finite after the cast (NumericalError otherwise)."""
    out = {}
    for m in modules:
        prefix = PEFT_PREFIX + m.name
        a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if m.kind == "embedding" else (".lora_A.weight", ".lora_B.weight")
        A, B = _balanced(m.A.detach().to("cpu"), m.B.detach().to("cpu"), dtype) if dtype.is_floating_point else (m.A, m.B)
        out[prefix + a_key] = A.to("cpu", dtype).contiguous()
        out[prefix + b_key] = B.to("cpu", dtype).contiguous()
        for key in (a_key, b_key):
            check_finite_as_written(out[prefix + key], module=m.name, path=path)
        _check_product_fits(out[prefix + a_key], out[prefix + b_key], module=m.name, path=path)
    return out


def _check_product_fits(A: torch.Tensor, B: torch.Tensor, *, module: str, path: Path | str | None) -> None:
    """Finite factors can still hold a delta ``B @ A`` beyond the dtype (what PEFT's merge forms): refuse that.
    The bound r * max|B| * max|A| settles almost every module; only the rare rest forms the product."""
    if not A.is_floating_point() or not A.numel() or not B.numel():
        return
    limit = torch.finfo(A.dtype).max
    if A.shape[0] * float(A.abs().amax()) * float(B.abs().amax()) <= limit:
        return
    if float((B.double() @ A.double()).abs().amax()) > limit:
        name = _dtype_name(A.dtype)
        raise NumericalError(f"the module's delta B @ A overflows {name} (above {limit:.4g})",
                             path=str(path) if path else None, module=module,
                             fix="lower the adapters' weights (or lambda), or use dtype: float32")


def _as_os_error(exc: Exception, path: Path | str) -> OSError:
    """safetensors reports I/O failures (a full disk, a file-size limit) as SafetensorError("... (os error N)")."""
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else str(exc), str(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path | str, *, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, its write failures raised as ``OSError`` (so callers map them to OutputError)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise _as_os_error(exc, path) from exc


@contextlib.contextmanager
def atomic_directory(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; on success move it into place."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; PEFT's os.makedirs gives 0777 minus the umask
    except OSError as exc:
        raise OutputError(f"could not create the output directory: {exc}", path=str(output), fix=_WRITE_FIX) from exc
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError) and "serializ" in str(exc):  # safetensors' own write error
            exc = _as_os_error(exc, tmp)
        if isinstance(exc, OSError) and not isinstance(exc, LoramergeError):
            raise OutputError(f"could not write the output: {exc}", path=str(output), fix=_WRITE_FIX) from exc
        if isinstance(exc, OutputError) and (exc.path is None or str(tmp) in exc.path):  # a nested write failed
            raise OutputError(exc.message, path=str(output), fix=exc.fix) from exc
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    tensors = tensors_for(modules, dtype, path=output)  # NaN/Inf in the written dtype: refused before any write
    try:
        with atomic_directory(output, force=force) as tmp:
            save_tensors(tensors, tmp / SAFETENSORS_NAME, metadata={"format": "pt", **(metadata or {})})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if card is not None:
                (tmp / "README.md").write_text(card)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    except OSError as exc:
        raise OutputError(f"could not write the adapter: {exc}", path=str(output), fix=_WRITE_FIX) from exc
    return Path(output)
