"""The adapter data model: LoRA factors per module, read lazily from a PEFT adapter.

On load the adapter's scale (alpha/r, alpha/sqrt(r) for rsLoRA, with
``rank_pattern``/``alpha_pattern`` overrides) is folded into ``B`` so that every
method works on ``delta_W = B @ A`` with no scale to forget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch

from loramerge.core.safetensors_file import TensorFile, TensorLayout, read_header, read_with_safetensors
from loramerge.errors import AdapterLoadError, NumericalError, UnsupportedAdapterError

ModuleKind = Literal["linear", "embedding"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_KEY_SUFFIXES: dict[str, tuple[ModuleKind, str]] = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}

# Config fields whose non-default value changes what the adapter computes and
# that we cannot represent as plain factors. Each maps to (reason, fix).
_REFUSED_FIELDS: dict[str, tuple[str, str]] = {
    "use_dora": ("DoRA rescales W0+BA by a learned magnitude vector, so it is not an additive delta",
                 "merge it into the base with PEFT's merge_and_unload, or retrain without DoRA (use_dora=False)"),
    "lora_bias": ("lora_bias adds a trained bias to lora_B that a factor merge would drop",
                  "retrain with lora_bias=False"),
    "modules_to_save": ("modules_to_save stores full weights (not deltas)",
                        "remove them from the adapter (keep them separately) or retrain without modules_to_save"),
    "target_parameters": ("LoRA on raw parameters (target_parameters) is not supported yet",
                          "retrain with target_modules instead of target_parameters"),
    "layer_replication": ("layer_replication changes the model's layers",
                          "merge the adapter into its base with PEFT's merge_and_unload instead"),
    "use_qalora": ("QA-LoRA pools inputs before A; it is not a plain LoRA delta",
                   "merge it with PEFT's own tooling, or retrain as plain LoRA"),
    "alora_invocation_tokens": ("aLoRA activates only after invocation tokens; it is not a plain LoRA delta",
                                "merge it with PEFT's own tooling, or retrain as plain LoRA"),
}

# PEFT saves the full base layer of targeted embedding / lm_head modules (save_embedding_layers, on by
# default when they are targeted) so that a resized vocabulary can be restored; they are not part of the delta.
_BASE_COPY_SUFFIX = ".base_layer.weight"

log = logging.getLogger("loramerge.core.adapter")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank delta: ``delta_W = B @ A`` with the scale already in ``B``.

    ``A`` is (r x d_in), ``B`` is (d_out x r). For embedding LoRA, d_in is the
    vocabulary size and d_out the embedding width (PEFT's own layout).
    ``scale`` records the factor folded into ``B`` (needed only to reproduce
    PEFT's factor-wise merges).
    """

    A: torch.Tensor
    B: torch.Tensor
    kind: ModuleKind = "linear"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"factors do not chain: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense (d_out x d_in) delta. Only for element-wise methods and tests."""
        return self.B @ self.A


@dataclass(frozen=True)
class ModuleInfo:
    """What the file says about one module, known before any tensor is read."""

    name: str
    kind: ModuleKind
    key_A: str
    key_B: str
    rank: int
    d_in: int
    d_out: int
    scale: float


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter came from, for the model card."""

    reference: str
    local_path: Path
    revision: str | None = None


def _match_pattern(patterns: dict, module: str) -> str | None:
    """PEFT's pattern rule: a key matches a module whose name ends with it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scale(config: dict, module: str, rank: int) -> float:
    """The scale PEFT applies to ``module``: alpha/r or alpha/sqrt(r), with pattern overrides."""
    alpha = config.get("lora_alpha", 8)
    key = _match_pattern(config.get("alpha_pattern") or {}, module)
    if key is not None:
        alpha = config["alpha_pattern"][key]
    if config.get("use_rslora", False):
        return alpha / math.sqrt(rank)
    return alpha / rank


def expected_rank(config: dict, module: str) -> int:
    key = _match_pattern(config.get("rank_pattern") or {}, module)
    return int(config["rank_pattern"][key]) if key is not None else int(config.get("r", 8))


def resolve_reference(reference: str | Path, revision: str | None = None) -> AdapterSource:
    """A local directory, or a hub id downloaded with ``huggingface_hub`` (weights and config only)."""
    ref = str(reference)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterLoadError(
                "an adapter must be a directory holding adapter_config.json", path=str(path),
                fix="pass the adapter's directory, not a file inside it",
            )
        return AdapterSource(reference=ref, local_path=path.resolve(), revision=revision)
    if not _HUB_ID.match(ref):
        raise AdapterLoadError(
            "adapter not found: not a local directory and not a hub id (user/name)", path=ref,
            fix="check the path, or give a hub repository id such as 'user/my-lora'",
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with peft
        raise AdapterLoadError("huggingface_hub is needed to download adapters", path=ref,
                               fix="pip install huggingface_hub") from exc
    try:
        local = snapshot_download(
            repo_id=ref, revision=revision,
            allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, "README.md"],
        )
    except Exception as exc:
        raise AdapterLoadError(
            f"could not download adapter '{ref}' from the hub: {exc}", path=ref,
            fix="check the repository id and your network or HF_TOKEN, or download it and pass the local path",
        ) from exc
    return AdapterSource(reference=ref, local_path=Path(local), revision=revision)


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterLoadError(
            f"missing {CONFIG_NAME}", path=str(cfg_path),
            fix="point at a directory written by PEFT's save_pretrained (it holds adapter_config.json)",
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{CONFIG_NAME} is not valid JSON: {exc}", path=str(cfg_path),
                               fix="repair or re-save the adapter config") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{CONFIG_NAME} must hold a JSON object", path=str(cfg_path),
                               fix="repair or re-save the adapter config")
    return config


def _validate_config(config: dict, cfg_path: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"peft_type is {peft_type}; loramerge merges LoRA adapters only", path=str(cfg_path),
            fix="convert the adapter to LoRA or merge it with its own PEFT tooling",
        )
    for name, (reason, fix) in _REFUSED_FIELDS.items():
        if config.get(name):
            raise UnsupportedAdapterError(f"field '{name}' is set: {reason}", path=str(cfg_path), fix=fix)
    if config.get("bias", "none") not in (None, "none"):
        raise UnsupportedAdapterError(
            f"field 'bias' is '{config['bias']}': trained base biases are not part of the LoRA delta",
            path=str(cfg_path), fix="retrain with bias='none'",
        )
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterLoadError(f"field 'r' must be a positive integer, got {r!r}", path=str(cfg_path),
                               fix="repair adapter_config.json")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterLoadError(f"field 'lora_alpha' must be a number, got {alpha!r}", path=str(cfg_path),
                               fix="repair adapter_config.json")


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk, read module by module.

    Nothing but the config and the safetensors header is read at construction;
    ``factors(name)`` reads that module's two tensors.
    """

    name: str
    source: AdapterSource
    config: dict
    weights_path: Path
    modules: dict[str, ModuleInfo] = field(repr=False)
    dtype: torch.dtype = torch.float32
    allow_pickle: bool = False
    _pickled: dict | None = field(default=None, repr=False)
    _layout: dict[str, TensorLayout] = field(default_factory=dict, repr=False)
    _file: TensorFile | None = field(default=None, repr=False)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.weights_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def _read(self, key: str) -> torch.Tensor:
        """One tensor, read from the weight file opened once for the adapter's life (a positioned read of
        exactly its bytes, at the offset the header gave; no re-parse of the header, no re-open)."""
        if self._pickled is not None:
            return self._pickled[key]
        layout = self._layout.get(key)
        if layout is None:  # built by hand without a layout: fall back to safetensors
            return read_with_safetensors(self.weights_path, key)
        if self._file is None:
            self._file = TensorFile(self.weights_path)
        try:
            return self._file.read(layout)
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(
                f"could not read tensor '{key}': {exc}", path=str(self.weights_path),
                fix="the weight file is damaged or changed while reading; re-download or re-save the adapter",
            ) from exc

    def close(self) -> None:
        """Close the weight file (it is reopened on the next read)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def factors(self, module: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoraFactors:
        """Read one module's factors, scale folded into B, in ``dtype`` on ``device``."""
        info = self.modules[module]
        A = self._read(info.key_A).to(device=device, dtype=dtype)
        B = self._read(info.key_B).to(device=device, dtype=dtype)
        if not (all_finite(A) and all_finite(B)):
            raise NumericalError(
                f"adapter '{self.name}' holds NaN or Inf values", path=str(self.weights_path), module=module,
                fix="the adapter's training diverged or the file is damaged; use a clean checkpoint",
            )
        return LoraFactors(A=A, B=B * info.scale, kind=info.kind, scale=info.scale)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: one reduction (a NaN or Inf makes the float32 sum non-finite), and the exact
    element-wise test only when the sum is not finite (a NaN, an Inf, or an overflow of huge finite values)."""
    if x.numel() == 0 or not x.is_floating_point():
        return True
    if math.isfinite(float(x.sum(dtype=torch.float32 if x.dtype != torch.float64 else x.dtype))):
        return True
    return bool(torch.isfinite(x).all())


def _index_tensors(keys_and_shapes: dict[str, tuple[int, ...]], config: dict, weights_path: Path) -> dict[str, ModuleInfo]:
    """Group tensor keys into modules, check shapes against the config, compute scales."""
    parts: dict[str, dict[str, tuple[str, tuple[int, ...], ModuleKind]]] = {}
    base_copies: dict[str, str] = {}
    for key, shape in keys_and_shapes.items():
        for suffix, (kind, role) in _KEY_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
                parts.setdefault(module, {})[role] = (key, shape, kind)
                break
        else:
            if key.endswith(_BASE_COPY_SUFFIX):
                module = key[: -len(_BASE_COPY_SUFFIX)]
                base_copies[module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module] = key
                continue
            reason = "an unrecognised tensor"
            if "magnitude" in key:
                reason = "a DoRA magnitude vector"
            elif key.endswith(".lora_B.bias"):
                reason = "a lora_bias term"
            raise UnsupportedAdapterError(
                f"the weights hold {reason} ('{key}') that a LoRA merge cannot represent",
                path=str(weights_path),
                fix="merge only plain LoRA adapters (no DoRA, lora_bias, modules_to_save or trainable tokens)",
            )
    modules: dict[str, ModuleInfo] = {}
    for module, roles in sorted(parts.items()):
        if set(roles) != {"A", "B"}:
            missing = ({"A", "B"} - set(roles)).pop()
            raise AdapterLoadError(f"module has lora_{missing} missing", path=str(weights_path), module=module,
                                   fix="the adapter file is incomplete; re-save it with PEFT")
        key_A, shape_A, kind = roles["A"]
        key_B, shape_B, _ = roles["B"]
        if len(shape_A) != 2 or len(shape_B) != 2:
            raise UnsupportedAdapterError(
                f"non-2-D LoRA factors {shape_A} / {shape_B} (Conv2d LoRA?) are not supported",
                path=str(weights_path), module=module, fix="merge Linear, Conv1D or Embedding LoRA only",
            )
        rank = shape_A[0]
        if shape_B[1] != rank:
            raise AdapterLoadError(f"lora_A has rank {rank} but lora_B has {shape_B[1]} columns",
                                   path=str(weights_path), module=module, fix="the adapter file is damaged")
        if rank == 0:
            raise AdapterLoadError("rank 0 factors", path=str(weights_path), module=module,
                                   fix="remove the module from the adapter or re-save it")
        want = expected_rank(config, module)
        if want != rank:
            raise AdapterLoadError(
                f"config says rank {want} for this module but the weights have rank {rank}",
                path=str(weights_path), module=module,
                fix="make r / rank_pattern in adapter_config.json match the saved weights",
            )
        modules[module] = ModuleInfo(
            name=module, kind=kind, key_A=key_A, key_B=key_B, rank=rank,
            d_in=shape_A[1], d_out=shape_B[0], scale=module_scale(config, module, rank),
        )
    if not modules:
        raise AdapterLoadError("the adapter holds no LoRA tensors", path=str(weights_path),
                               fix="check that this is a LoRA adapter saved by PEFT")
    stray = sorted(set(base_copies) - set(modules))
    if stray:
        raise UnsupportedAdapterError(
            f"the weights hold a full copy of a base weight ('{base_copies[stray[0]]}') with no LoRA on it",
            path=str(weights_path), module=stray[0],
            fix="merge only plain LoRA adapters (no modules_to_save or trainable tokens)",
        )
    if base_copies:
        log.info("%s: ignoring PEFT's saved copies of the base embedding layers (%s); the merge keeps only "
                 "the LoRA deltas, which apply to the base model's own layers", weights_path, ", ".join(base_copies))
    return modules


def load_adapter(
    reference: str | Path,
    *,
    name: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> LoraAdapter:
    """Open a PEFT LoRA adapter (directory or hub id) for lazy, module-by-module reading."""
    source = resolve_reference(reference, revision)
    path = source.local_path
    config = _read_config(path)
    _validate_config(config, path / CONFIG_NAME)
    st_path = path / SAFETENSORS_NAME
    pickled = None
    layout: dict[str, TensorLayout] = {}
    if st_path.is_file():
        layout = read_header(st_path)
        header = {k: (v.shape, v.dtype) for k, v in layout.items()}
        weights_path = st_path
    elif (path / PICKLE_NAME).is_file():
        weights_path = path / PICKLE_NAME
        if not allow_pickle:
            raise AdapterLoadError(
                "weights are a pickled adapter_model.bin; unpickling can run arbitrary code", path=str(weights_path),
                fix="convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source",
            )
        try:
            pickled = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"could not read pickled weights: {exc}", path=str(weights_path),
                                   fix="re-save the adapter as safetensors") from exc
        header = {k: (tuple(v.shape), v.dtype) for k, v in pickled.items()}
    else:
        raise AdapterLoadError(
            f"no weights: neither {SAFETENSORS_NAME} nor {PICKLE_NAME}", path=str(path),
            fix="the adapter directory is incomplete; re-save it with PEFT's save_pretrained",
        )
    modules = _index_tensors({k: s for k, (s, _) in header.items()}, config, weights_path)
    dtypes = {d for _, d in header.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return LoraAdapter(
        name=name or path.name, source=source, config=config, weights_path=weights_path,
        modules=modules, dtype=dtype, allow_pickle=allow_pickle, _pickled=pickled, _layout=layout,
    )
