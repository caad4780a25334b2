"""The bundle seam: rebuild one task's adapter from a basis or Twin bundle directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from loramerge.artifacts import basis, twin
from loramerge.core.adapter import LoraFactors


class BundleExtractor(Protocol):
    """Rebuild one task's adapter from a bundle directory: module name -> factors (scale folded).

    Raises KeyError for a task the bundle does not hold.
    """

    def __call__(self, bundle_dir: Path, task: str) -> Mapping[str, LoraFactors]: ...


def default_bundle_extractors() -> dict[str, BundleExtractor]:
    """``basis:DIR/task`` and ``twin:DIR/task``: the artifacts' own ``task_factors``."""
    return {"basis": basis.task_factors, "twin": twin.task_factors}


__all__ = ["BundleExtractor", "default_bundle_extractors"]
