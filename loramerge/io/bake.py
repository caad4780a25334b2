"""Bake: merge a LoRA adapter (or a merge's result) into its base model's weights and save a full model.

The base's safetensors are streamed shard by shard: each targeted weight gets ``B @ A`` added in float32
(transposed for GPT-2's ``Conv1D``, whose weight is ``d_in x d_out``, and for embeddings, whose weight is
``vocab x dim``), then the shard is written in the output dtype. A bitsandbytes 4-bit or 8-bit checkpoint
is dequantized first (with a notice). Tied weights (GPT-2's ``wte``/``lm_head``) that an adapter touches
are untied, since PEFT's forward adds the delta to one of them only. The output directory is written
atomically (temporary directory, renamed into place).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.core.dtypes import OUTPUT_DTYPE_NAMES, to_torch
from loramerge.core.progress import progress_bar
from loramerge.errors import IncompatibleAdaptersError, OutputError
from loramerge.io.checkpoint import (
    INDEX_NAME,
    Architecture,
    Layout,
    TensorReader,
    architecture,
    bnb_companions,
    dequantize,
    dequantized_dtype,
    dtype_from_name,
    import_bnb,
    quantization_of,
    read_config,
    shard_map,
)
from loramerge.io.writer import atomic_directory, check_finite_as_written, check_output_path

log = logging.getLogger("loramerge.io.bake")

# Weight files of other formats, and files bake rewrites itself: never copied from the base.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REWRITTEN = {"config.json", "README.md", INDEX_NAME, "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class BakeResult:
    """A baked model: where it went, what changed, what was noticed on the way."""

    output: Path
    dtype: torch.dtype
    baked_modules: list[str]
    dequantized: str | None = None
    untied: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


@dataclass
class DeltaSource:
    """What bake needs from an adapter or a merge result: module name -> factors (scale folded into B)."""

    kinds: dict[str, str]
    read: Callable[[str], LoraFactors]
    fan_in_fan_out: bool
    inputs: list[Path]
    label: str
    base_model: str | None


def delta_source(obj: Any, *, allow_pickle: bool = False) -> DeltaSource:
    """Accept an adapter path / hub id, a loaded ``LoraAdapter``, or anything with a ``delta_source()`` method
    (a ``MergeResult`` describes itself: io never imports the merge engine)."""
    if callable(getattr(obj, "delta_source", None)):
        return obj.delta_source()
    adapter = obj if isinstance(obj, LoraAdapter) else load_adapter(obj, allow_pickle=allow_pickle)
    return DeltaSource(
        kinds={n: m.kind for n, m in adapter.modules.items()}, read=adapter.factors,
        fan_in_fan_out=bool(adapter.config.get("fan_in_fan_out")), inputs=[adapter.source.local_path],
        label=f"adapter {adapter.source.reference}", base_model=adapter.base_model,
    )


def delta_in_layout(factors: LoraFactors, layout: Layout) -> torch.Tensor:
    """``B @ A`` in the base weight's storage layout (Conv1D and Embedding store the transpose)."""
    delta = factors.B.float() @ factors.A.float()
    return delta.T if layout in ("conv1d", "embedding") else delta


# ---------------------------------------------------------------------------------------------- bake


@dataclass
class _Plan:
    """Which stored keys change, and which tied weights must be written out separately."""

    targets: dict[str, str]
    """stored key -> module whose delta it gets (for stored weights)"""
    materialise: dict[str, tuple[str, str | None]]
    """missing tied key -> (stored key it copies, module whose delta it gets or None)"""
    untied: list[str]


def _plan(modules: list[str], stored: set[str], arch: Architecture, base: Path, adapter_base: str | None) -> _Plan:
    targets: dict[str, str] = {}
    materialise: dict[str, tuple[str, str | None]] = {}
    untied: list[str] = []
    group_of = {p: g for g in arch.tied_groups for p in g}
    wanted = {m + ".weight": m for m in modules}
    for key, module in wanted.items():
        group = group_of.get(key)
        if group is not None:
            source = next((p for p in group if p in stored), None)
            if source is None:
                continue
            for member in group:
                if member in stored:
                    if member in wanted:
                        targets[member] = wanted[member]
                else:
                    materialise[member] = (source, wanted.get(member))
            untied.extend(p for p in group if p not in untied)
        elif key in stored:
            targets[key] = module
    missing = [m for m in modules if m + ".weight" not in targets and m + ".weight" not in materialise]
    if missing:
        raise IncompatibleAdaptersError(
            f"the base model has no weight for {len(missing)} adapted module(s), e.g. '{missing[0]}'",
            path=str(base), module=missing[0],
            fix=f"bake into the base model the adapter was trained on (its config names '{adapter_base}')",
        )
    return _Plan(targets=targets, materialise=materialise, untied=untied)


def _fallback_layout(source: DeltaSource, module: str) -> Layout:
    if source.kinds.get(module) == "embedding":
        return "embedding"
    return "conv1d" if source.fan_in_fan_out else "linear"


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return to_torch(dtype, allowed=OUTPUT_DTYPE_NAMES)


def _add(weight: torch.Tensor, factors: LoraFactors, layout: Layout, module: str, shard: Path) -> torch.Tensor:
    delta = delta_in_layout(factors, layout)
    if tuple(weight.shape) != tuple(delta.shape):
        raise IncompatibleAdaptersError(
            f"the adapter's delta is {tuple(delta.shape)} ({layout} layout) but the base weight is "
            f"{tuple(weight.shape)}", path=str(shard), module=module,
            fix="bake the adapter into the base model it was trained on",
        )
    return weight.float() + delta


def _out_config(config: dict, dtype: torch.dtype | None, untied: list[str]) -> dict:
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
        for key in keys:
            out[key] = name
    if untied:
        out["tie_word_embeddings"] = False
    return out


def _card(source: DeltaSource, base_ref: str, dtype_name: str, dequantized: str | None, untied: list[str]) -> str:
    from loramerge.version import __version__

    lines = ["---", "library_name: transformers", "tags:", "- loramerge", "- lora", "- baked"]
    if "/" in base_ref and not Path(base_ref).exists():
        lines.append(f"base_model: {base_ref}")
    lines += ["---", "", "# Baked model", "",
              f"Base model `{base_ref}` with {source.label} merged into its weights "
              f"(W + B @ A per adapted module), made with loramerge {__version__} (`loramerge bake`).", "",
              f"- adapted modules: {len(source.kinds)}", f"- dtype: {dtype_name}"]
    if dequantized:
        lines.append(f"- the base was a {dequantized} checkpoint, dequantized before merging")
    if untied:
        lines.append(f"- untied weights (the adapter changes only one of them): {', '.join(untied)}")
    return "\n".join(lines) + "\n"


def _dtype_label(config: dict, dtype: torch.dtype | None) -> str:
    if dtype is not None:
        return str(dtype).replace("torch.", "")
    return f"as the base ({config.get('dtype') or config.get('torch_dtype') or 'unknown'})"


def _write_side_files(tmp: Path, base: Path, config: dict, card: str) -> None:
    """config.json, the model card, and the base's small files (tokenizer, generation config, ...)."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for item in sorted(base.iterdir()):
        if (item.is_file() and not item.name.startswith(".") and item.name not in _REWRITTEN
                and not item.name.endswith(_NOT_COPIED_SUFFIXES)):
            shutil.copy2(item, tmp / item.name)
    (tmp / "README.md").write_text(card)


@dataclass
class _ShardBaker:
    """Turns one base shard into its baked tensors: dequantize, add the deltas, cast."""

    base: Path
    source: DeltaSource
    plan: _Plan
    companions: dict[str, list[str]]
    reader: TensorReader
    conv1d: set[str]
    layouts: dict[str, Layout]
    out_dtype: torch.dtype | None
    dequant_dtype: torch.dtype
    stored: set[str]
    baked: list[str] = field(default_factory=list)

    def unpacked(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """A stored tensor in the unquantized model's storage layout (a packed one dequantized to float32)."""
        if key not in self.companions:
            return raw
        weight = dequantize(raw, key, self.companions[key], self.reader)
        return weight.T.contiguous() if key[: -len(".weight")] in self.conv1d else weight

    def saved_as(self, key: str, raw: torch.Tensor) -> torch.dtype:
        if key in self.companions:
            return self.dequant_dtype
        if not raw.dtype.is_floating_point:
            return raw.dtype
        return self.out_dtype or raw.dtype

    def with_delta(self, weight: torch.Tensor, module: str | None, shard: Path) -> torch.Tensor:
        if module is None:
            return weight.clone()
        self.baked.append(module)
        return _add(weight, self.source.read(module), self.layouts[module], module, shard)

    def shard(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self.base / name
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key not in self.stored:
                    continue
                raw = fh.get_tensor(key)
                value, dtype = self.unpacked(key, raw), self.saved_as(key, raw)
                for member, (source_key, member_module) in self.plan.materialise.items():
                    if source_key == key:
                        tensors[member] = self.with_delta(value, member_module, path).to(dtype).contiguous()
                        if member_module is not None:  # checked as written, after the cast (issue 14)
                            check_finite_as_written(tensors[member], module=member_module, path=name)
                if key in self.plan.targets:
                    value = self.with_delta(value, self.plan.targets[key], path)
                tensors[key] = value.to(dtype).contiguous()
                if key in self.plan.targets:
                    check_finite_as_written(tensors[key], module=self.plan.targets[key], path=name)
        return tensors


def bake(
    adapter_or_merge_result: Any,
    base_model_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    force: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
    show_progress: bool = False,
) -> BakeResult:
    """Merge an adapter (path, hub id, ``LoraAdapter`` or ``MergeResult``) into a base model and save it.

    ``dtype='auto'`` keeps each tensor's dtype (a dequantized weight takes the model's dtype, else bf16);
    ``float32``/``float16``/``bfloat16`` casts every floating-point tensor. The output holds the shards
    (same names), config.json (quantization removed), the tokenizer and other small files of the base,
    and a model card.
    """
    out_dtype = _resolve_dtype(dtype)
    source = delta_source(adapter_or_merge_result, allow_pickle=allow_pickle)
    from loramerge.io.hub import resolve_model

    base = resolve_model(base_model_path, revision=revision)
    output = check_output_path(Path(out_dir), force=force, inputs=[base, *source.inputs])
    config = read_config(base)
    key_to_shard, sharded = shard_map(base)
    quantized = quantization_of(config)
    notices: list[str] = []
    if quantized:
        import_bnb()
        notices.append(f"the base is a {quantized} checkpoint: its weights are dequantized before the adapter is "
                       "merged, and the baked model is saved unquantized (quantize it again when you load it)")
    modules = sorted(source.kinds)
    arch = architecture(base)
    if not arch.known:
        notices.append("could not build the model's module tree from config.json (unknown architecture); using "
                       f"the adapter's fan_in_fan_out={source.fan_in_fan_out} for weight layouts, and tied "
                       "weights could not be detected (check an embedding or lm_head LoRA by hand)")
    companions = bnb_companions(set(key_to_shard)) if quantized else {}
    state_keys = {c for cs in companions.values() for c in cs}
    stored = set(key_to_shard) - state_keys
    plan = _plan(modules, stored, arch, base, source.base_model)
    if plan.untied:
        notices.append(f"untied {', '.join(plan.untied)}: the adapter changes only one of them, "
                       "so they are saved as separate tensors")
    for notice in notices:
        log.warning(notice)
    job = _ShardBaker(
        base=base, source=source, plan=plan, companions=companions, reader=TensorReader(base, key_to_shard),
        conv1d={m for m, lay in arch.layouts.items() if lay == "conv1d"},
        layouts={m: arch.layouts.get(m) or _fallback_layout(source, m) for m in modules},
        out_dtype=out_dtype, dequant_dtype=out_dtype or dequantized_dtype(config), stored=stored,
    )
    weight_map: dict[str, str] = {}
    total_size = 0
    from safetensors.torch import save_file

    try:
        with atomic_directory(output, force=force) as tmp:
            for shard in progress_bar(sorted(set(key_to_shard.values())), description="baking", enabled=show_progress):
                tensors = job.shard(shard)
                save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
                for key, tensor in tensors.items():
                    weight_map[key] = shard
                    total_size += tensor.numel() * tensor.element_size()
                del tensors
            if sharded:
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            config_dtype = out_dtype or (job.dequant_dtype if quantized else None)
            _write_side_files(tmp, base, _out_config(config, config_dtype, plan.untied),
                              _card(source, str(base_model_path), _dtype_label(config, config_dtype), quantized,
                                    plan.untied))
    except OSError as exc:
        raise OutputError(f"could not write the baked model: {exc}", path=str(output),
                          fix="check free disk space (a full model needs as much as the base) and permissions; "
                          "nothing was changed at the output path") from exc
    saved_dtype = config_dtype or dtype_from_name(config.get("dtype") or config.get("torch_dtype")) or torch.float32
    return BakeResult(output=output, dtype=saved_dtype, baked_modules=sorted(set(job.baked)),
                      dequantized=quantized, untied=plan.untied, notices=notices)


__all__ = ["BakeResult", "bake", "delta_source", "dequantize", "quantization_of"]
