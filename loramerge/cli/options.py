"""Validators for command-line option values, called at the start of a command, before any work is done.

Each turns a malformed value into an ``OptionError`` (exit 2) naming the option and the fix, instead of
a traceback from deep inside the run (issue 14). Paths to be written are checked here too, so that a
command never fails after its main output was already written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from loramerge.errors import BaseModelError, OptionError

_DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


def parse_rank(value: str | None, option: str = "--rank") -> Any:
    """``exact``, ``auto``, ``max``, a positive integer or ``energy:F`` with 0 < F <= 1 (RankPolicy's forms)."""
    if value is None:
        return None
    from loramerge.core.factored import RankPolicy

    text = value.strip()
    parsed: Any = text
    if text.startswith("energy:"):
        try:
            parsed = {"energy": float(text.split(":", 1)[1])}
        except ValueError:
            parsed = None
    try:
        if parsed is None:
            raise ValueError(text)
        RankPolicy.parse(parsed)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"{option} '{value}' is not a rank policy ({exc})",
                          fix=f"use {option} exact, auto, max, a positive integer, or energy:0.99") from exc
    return parsed


def check_device(value: str, option: str = "--device") -> str:
    """A torch device string whose kind is available here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"{option} '{value}' is not a device", fix=f"use {option} cpu, cuda or cuda:N") from exc
    if device.type not in _DEVICE_KINDS:
        raise OptionError(f"{option} '{value}': device type '{device.type}' is not supported",
                          fix=f"use {option} cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"{option} '{value}' asked for, but no CUDA device is available",
                              fix=f"use {option} cpu")
        if device.index is not None and device.index >= count:
            raise OptionError(f"{option} '{value}': there are only {count} CUDA device(s)",
                              fix=f"use {option} cuda:0 .. cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{option} '{value}' asked for, but MPS is not available", fix=f"use {option} cpu")
    return value


def check_choice(value: str, choices: tuple[str, ...] | list[str], option: str) -> str:
    if value not in choices:
        raise OptionError(f"{option} '{value}' is not one of {', '.join(choices)}",
                          fix=f"use {option} {' or '.join(choices)}")
    return value


def parse_method_params(text: str | None, option: str = "--params") -> dict[str, dict]:
    """A JSON object mapping method names to objects of parameters: ``{"ties": {"density": 0.3}}``."""
    if not text:
        return {}
    fix = f'''use {option} '{{"ties": {{"density": 0.3}}}}' (a JSON object of objects, one per method)'''
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise OptionError(f"{option} is not valid JSON ({exc})", fix=fix) from exc
    if not isinstance(value, dict):
        raise OptionError(f"{option} must be a JSON object, got {type(value).__name__}", fix=fix)
    for method, params in value.items():
        if not isinstance(params, dict):
            raise OptionError(f"{option}: the parameters of '{method}' must be an object, got "
                              f"{type(params).__name__}", fix=fix)
    return value


def parse_weights(text: str | None, count: int, option: str = "--weights") -> list[float] | None:
    """Comma-separated finite numbers, one per adapter."""
    if text is None:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise OptionError(f"{option} '{text}' holds a value that is not a number", fix=f"use {option} 0.7,0.3") from exc
    if not all(math.isfinite(w) for w in weights):
        raise OptionError(f"{option} '{text}' holds NaN or Inf", fix="use finite weights")
    if len(weights) != count:
        raise OptionError(f"{option} gives {len(weights)} weights for {count} adapters", fix="give one weight per adapter")
    return weights


def check_writable_file(path: Path | None, option: str) -> Path | None:
    """A file the command will write at the end: its directory must exist and be writable, and it must not be
    a directory. Checked before the work, so that the main output is never written and then the command fails."""
    if path is None:
        return None
    path = Path(path).expanduser()
    parent = path.resolve().parent
    if path.is_dir():
        raise OptionError(f"{option} is a directory", path=str(path), fix=f"give {option} a file path, e.g. report.json")
    if not parent.is_dir():
        raise OptionError(f"{option}: the directory does not exist", path=str(parent),
                          fix="create the directory first, or choose an existing one")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"{option} cannot be written (permissions)", path=str(path),
                          fix="choose a writable location or fix its permissions")
    return path


def check_local_model_dir(path: Path | str, option: str = "BASE") -> Path:
    """A local model directory written by ``save_pretrained`` (it holds config.json)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"{option}: the base model directory does not exist", path=str(path),
                             fix="pass a local directory written by save_pretrained (model and tokenizer)")
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{option}: not a model directory (no config.json)", path=str(path),
                             fix="pass the directory written by save_pretrained (model and tokenizer)")
    return path


__all__ = ["check_choice", "check_device", "check_local_model_dir", "check_writable_file", "parse_method_params",
           "parse_rank", "parse_weights"]
