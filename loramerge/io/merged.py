"""Write a merge result: the PEFT adapter, its model card and ``loramerge.json`` (the full per-module report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.core.dtypes import dtype_name
from loramerge.io.card import model_card
from loramerge.io.writer import check_output_path, write_adapter
from loramerge.version import __version__

if TYPE_CHECKING:
    from loramerge.core.adapter import LoraAdapter
    from loramerge.merging.engine import MergeResult
    from loramerge.merging.recipe import AdapterEntry

MANIFEST_NAME = "loramerge.json"


def input_record(adapter: LoraAdapter, entry: AdapterEntry) -> dict:
    """What the manifest records of one input: name, source, revisions, checksum, weight, base model."""
    return {
        "name": adapter.name, "source": adapter.source.reference, "revision": adapter.source.revision,
        "sha256": adapter.sha256, "weight": entry.weight, "base_model": adapter.base_model,
        "base_model_revision": adapter.config.get("revision"),
    }


def manifest(result: MergeResult) -> dict:
    return {
        "loramerge_version": __version__,
        "method": result.method.name,
        "recipe": json.loads(result.recipe.model_dump_json()),
        "inputs": [input_record(a, e) for a, e in zip(result.adapters, result.recipe.adapters)],
        "dtype": dtype_name(result.dtype),
        "modules": [vars(r) | {"input_ranks": list(r.input_ranks)} for r in result.reports],
    }


def save(result: MergeResult, output: str | Path, *, force: bool = False) -> Path:
    """Write the merged adapter (config, weights, model card, manifest) atomically; sets ``result.output``."""
    out = check_output_path(Path(output), force=force, inputs=[a.source.local_path for a in result.adapters])
    write_adapter(
        out, result.modules, result.config, dtype=result.dtype, card=model_card(result), force=force,
        extra_files={MANIFEST_NAME: json.dumps(manifest(result), indent=2) + "\n"},
        metadata={"loramerge_method": result.method.name, "loramerge_version": __version__},
    )
    result.output = out
    return out


__all__ = ["MANIFEST_NAME", "input_record", "manifest", "save"]
