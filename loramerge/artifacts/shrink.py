"""Shrink one adapter to a smaller rank by clustering its own rank units (LoRA-LEGO's pruning use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.merging.engine import MergeResult, merge


def shrink_adapter(adapter: str | Path, k: int, output: str | Path | None = None, *, force: bool = False,
                   seed: int = 0, **parameters: Any) -> MergeResult:
    """Prune ``adapter`` to rank ``k`` with ``lora_lego`` over its own units; write it to ``output`` when given.

    ``parameters`` are LegoConfig fields (e.g. ``output_reweight="none"``).
    """
    return merge(adapters=[adapter], method="lora_lego", parameters={"k": k, **parameters},
                 output=output, force=force, seed=seed)


__all__ = ["shrink_adapter"]
