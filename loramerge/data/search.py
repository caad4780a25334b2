"""The search space of ``loramerge tune`` and the preparers of its data-informed methods.

Knobs are searched by name wherever a method's config has them (``lambda``, ``density``), plus a few
per method (RegMean's ``alpha``, LiNeS's ``alpha``/``beta``); everything else keeps its default. A method
whose registry ``data`` field is not "none" needs a *preparer*, run once per tuning session and cached:
the core prepares calibration statistics (RegMean, Fisher) itself; AdaMerging's comes from
``loramerge.routers.adamerging.tune_preparer``, passed in by the application (the core never imports
routers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.data.examples import Examples
from loramerge.data.scoring import ValidationTask
from loramerge.errors import RecipeError
from loramerge.merging.methods import get_method

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties", "magnitude_prune", "tsv", "iso_c")
PARAMETER_RANGES: dict[str, tuple[float, float]] = {"lambda": (0.1, 1.5), "density": (0.05, 0.95)}
"""The searched knobs of any method whose config has them (by alias or name); others keep their defaults."""
METHOD_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "regmean": {"alpha": (0.0, 1.0)},
    "lines": {"alpha": (0.0, 1.0), "beta": (0.0, 1.0)},
}
"""Knobs searched for one method only (e.g. RegMean's off-diagonal scale, LiNeS's alpha and beta)."""
POST_RANGES = {"alpha": (0.0, 1.0), "beta": (0.0, 1.0)}
"""LiNeS as a post-step (``post: lines``) on any method's merge, when ``SearchSpace.post``."""


@dataclass(frozen=True)
class SearchSpace:
    methods: tuple[str, ...] = DEFAULT_METHODS
    weights: bool = True
    """Also search one weight per adapter (in ``weight_range``)."""
    weight_range: tuple[float, float] = (0.0, 1.5)
    rank: str | int = "auto"
    post: bool = False
    """Also search LiNeS as a post-step (``post: lines``, alpha and beta) on every method."""

    def knobs(self, method: str) -> dict[str, tuple[float, float]]:
        """The searched parameters of ``method`` and their ranges."""
        name = get_method(method).name
        fields = get_method(method).config_cls.model_fields
        names = {f.alias or n for n, f in fields.items()}
        return {**{k: r for k, r in PARAMETER_RANGES.items() if k in names}, **METHOD_RANGES.get(name, {})}


@dataclass
class PrepareContext:
    """What a preparer gets: the base model, the adapters, the validation tasks, a cache directory."""

    model: Any
    tokenizer: Any
    adapters: list[Path]
    names: list[str]
    tasks: list[ValidationTask]
    examples: Examples
    cache_dir: Path
    seed: int = 0
    show_progress: bool = False


Preparer = Callable[[PrepareContext], dict]
"""Returns recipe fields for a data method: ``{"parameters": {...}}`` and/or e.g. ``{"calibration": DIR}``."""


def calibration_preparer(need: str) -> Preparer:
    """RegMean / Fisher: calibration statistics of each adapter on its validation prompts (once, cached)."""

    def prepare(ctx: PrepareContext) -> dict:
        from loramerge.data.calibration import calibrate
        from loramerge.data.statistics import MANIFEST

        target = ctx.cache_dir / f"calibration-{need}"
        if not (target / MANIFEST).is_file():
            calibrate((ctx.model, ctx.tokenizer), dict(zip(ctx.names, ctx.adapters)), ctx.examples, target,
                      fisher=need == "fisher", force=target.exists(), show_progress=ctx.show_progress)
        return {"calibration": str(target)}

    prepare.key = need  # type: ignore[attr-defined]
    return prepare


def default_preparers(methods: Sequence[str]) -> dict[str, Preparer]:
    """The core's preparers for the calibration methods among ``methods`` (AdaMerging's comes from routers)."""
    out = {}
    for name in methods:
        method = get_method(name)
        if method.data in ("gram", "fisher"):  # RegMean++ ("model") recomputes per merge: not searched here
            out[method.name] = calibration_preparer(method.data)
    return out


def check_budget(trials: int | None, minutes: float | None) -> None:
    if (trials is not None and trials < 0) or (minutes is not None and minutes < 0):
        raise RecipeError("a negative budget", fix="give --trials N >= 1 and/or --minutes M > 0")
    if (trials is None or trials <= 0) and (minutes is None or minutes <= 0):
        raise RecipeError("the tuning budget is zero", fix="give --trials N (N >= 1) and/or --minutes M (M > 0)")


def check_space(space: SearchSpace, preparers: Mapping[str, Preparer] | None = None) -> None:
    """Every method known, every data method preparable (the core prepares calibration statistics itself)."""
    preparers = {**default_preparers(space.methods), **(preparers or {})}
    if not space.methods:
        raise RecipeError("no methods to search", fix="name at least one method (`loramerge methods` lists them)")
    for name in space.methods:
        method = get_method(name)
        if method.data != "none" and method.name not in preparers:
            raise RecipeError(f"method '{method.name}' needs data ({method.data}) that tune cannot prepare here",
                              fix="drop it from --methods, or run it through the `loramerge tune` command")
    low, high = space.weight_range
    if not 0 <= low < high:
        raise RecipeError(f"bad weight range {space.weight_range}", fix="give 0 <= low < high")
