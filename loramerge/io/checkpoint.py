"""Read a transformers base-model checkpoint for ``bake``: config, shard map, quantization, module layouts
(from a meta-device skeleton), tensors by key, and bitsandbytes dequantization."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from loramerge.errors import BaseModelError

log = logging.getLogger("loramerge.io.checkpoint")

Layout = Literal["linear", "conv1d", "embedding"]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------- base model files


def read_config(base: Path) -> dict:
    path = base / "config.json"
    if not path.is_file():
        raise BaseModelError("the base model has no config.json", path=str(path),
                             fix="pass a directory written by transformers' save_pretrained (or a hub id)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaseModelError(f"config.json is not valid JSON: {exc}", path=str(path),
                             fix="repair or re-download the base model's config.json") from exc
    if not isinstance(config, dict):
        raise BaseModelError("config.json must hold a JSON object", path=str(path), fix="repair config.json")
    return config


def shard_map(base: Path) -> tuple[dict[str, str], bool]:
    """Every stored tensor key -> its shard file name; and whether the base is sharded (has an index)."""
    index = base / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BaseModelError(f"{INDEX_NAME} is malformed: {exc}", path=str(index),
                                 fix="repair or re-download the base model") from exc
        missing = sorted({s for s in weight_map.values() if not (base / s).is_file()})
        if missing:
            raise BaseModelError(f"shard {missing[0]} listed in the index is missing", path=str(base / missing[0]),
                                 fix="re-download the base model (an interrupted download?)")
        return dict(weight_map), True
    single = base / SINGLE_NAME
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as fh:
                return {k: SINGLE_NAME for k in fh.keys()}, False
        except Exception as exc:
            raise BaseModelError(f"corrupt safetensors file: {exc}", path=str(single),
                                 fix="re-download or re-save the base model") from exc
    if any(base.glob("*.bin")) or any(base.glob("*.pt")):
        raise BaseModelError(
            "the base model's weights are pickled (.bin/.pt); bake reads safetensors only", path=str(base),
            fix="convert once: load it with transformers and save_pretrained(dir) (safetensors is the default)",
        )
    raise BaseModelError(f"no {SINGLE_NAME} or {INDEX_NAME} in the base model directory", path=str(base),
                         fix="pass the directory of a transformers model saved with safetensors")


def quantization_of(config: dict) -> str | None:
    """'bitsandbytes 4-bit (nf4)' / 'bitsandbytes 8-bit' for a bnb checkpoint, None if unquantized."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise BaseModelError(
            f"the base model is quantized with '{method}'; bake can dequantize bitsandbytes checkpoints only",
            fix="bake into the unquantized base model (the adapter's factors do not depend on the quantization)",
        )
    if q.get("load_in_4bit"):
        return f"bitsandbytes 4-bit ({q.get('bnb_4bit_quant_type', 'fp4')})"
    return "bitsandbytes 8-bit"


def import_bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise BaseModelError(
            "the base model is a bitsandbytes checkpoint; dequantizing it needs bitsandbytes",
            fix="pip install 'loramerge[bnb]' (or pip install bitsandbytes), or bake into the unquantized base",
        ) from exc
    return bnb_functional


def dtype_from_name(name: Any) -> torch.dtype | None:
    dtype = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def dequantized_dtype(config: dict) -> torch.dtype:
    """The dtype a dequantized weight is saved in under dtype='auto': the model's, else the compute dtype, else bf16."""
    q = config.get("quantization_config") or {}
    for name in (config.get("dtype"), config.get("torch_dtype"), q.get("bnb_4bit_compute_dtype")):
        dtype = dtype_from_name(name)
        if dtype is not None:
            return dtype
    return torch.bfloat16


# ---------------------------------------------------------------------------------------------- architecture


@dataclass
class Architecture:
    """What the model's module tree says: each module's layout, and the groups of tied weights."""

    layouts: dict[str, Layout]
    tied_groups: list[list[str]]
    known: bool


def architecture(base: Path) -> Architecture:
    """Build the model on the meta device (no memory) to see Conv1D / Embedding modules and tied weights.

    When that is impossible (custom code), ``known`` is False and bake falls back to the adapter's flags.
    """
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        config = transformers.AutoConfig.from_pretrained(str(base))
        cls = getattr(transformers, (config.architectures or [""])[0])
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = cls(config)
    except Exception as exc:  # unknown or remote-code architecture
        log.debug("could not build the model skeleton: %s", exc)
        return Architecture(layouts={}, tied_groups=[], known=False)
    layouts: dict[str, Layout] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            layouts[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            layouts[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            layouts[name] = "linear"
    groups: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(pname)
    return Architecture(layouts=layouts, tied_groups=[g for g in groups.values() if len(g) > 1], known=True)


# ---------------------------------------------------------------------------------------------- tensors


class TensorReader:
    """Read any stored tensor by key, from whichever shard holds it (quant states may sit in another shard)."""

    def __init__(self, base: Path, key_to_shard: dict[str, str]):
        self.base = base
        self.key_to_shard = key_to_shard

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.base / self.key_to_shard[key]
        try:
            with safe_open(str(shard), framework="pt") as fh:
                return fh.get_tensor(key)
        except Exception as exc:
            raise BaseModelError(f"could not read tensor '{key}': {exc}", path=str(shard),
                                 fix="the base model's weight file is damaged; re-download it") from exc


def bnb_companions(keys: set[str]) -> dict[str, list[str]]:
    """Quantized weight key -> the keys of its bitsandbytes state (absmax, quant_map, SCB, ...)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        if ".quant_state.bitsandbytes__" in key:
            weight = key.split(".quant_state.bitsandbytes__")[0]
            out[weight] = sorted(k for k in keys if k.startswith(weight + "."))
        elif key.endswith(".SCB"):
            prefix = key[: -len(".SCB")]
            out[prefix + ".weight"] = [k for k in (key, prefix + ".weight_format") if k in keys]
    return out


def dequantize(packed: torch.Tensor, key: str, companions: list[str], reader: TensorReader) -> torch.Tensor:
    """A bitsandbytes-packed weight as float32 in nn.Linear layout (d_out x d_in)."""
    F = import_bnb()
    if any(".quant_state." in c for c in companions):
        state = {c[len(key) + 1:]: reader.get(c) for c in companions}
        quant_state = F.QuantState.from_dict(state, device=torch.device("cpu"))
        return F.dequantize_4bit(packed, quant_state).float()
    scb = reader.get(next(c for c in companions if c.endswith(".SCB")))
    return packed.float() * scb.float().unsqueeze(1) / 127.0


__all__ = [
    "INDEX_NAME", "SINGLE_NAME", "Architecture", "Layout", "TensorReader", "architecture", "bnb_companions",
    "dequantize", "dequantized_dtype", "dtype_from_name", "import_bnb", "shard_map", "quantization_of", "read_config",
]
