"""The merge driver: stream modules from the input adapters through one method into a PEFT adapter."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.core.factored import Compressed, RankPolicy, compress_dense, compress_factored
from loramerge.core.ops import derive_seed
from loramerge.core.progress import progress_bar
from loramerge.errors import IncompatibleAdaptersError, NumericalError, RecipeError
from loramerge.io.card import model_card
from loramerge.io.writer import OutputModule, build_lora_config, check_output_path, write_adapter
from loramerge.merging.methods import Dense, MergeMethod, ModuleInputs, get_method
from loramerge.merging.methods.data import build_post
from loramerge.merging.recipe import AdapterEntry, Recipe, load_recipe, parse_recipe, recipe_to_yaml
from loramerge.version import __version__

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModuleReport:
    name: str
    input_ranks: tuple[int, ...]
    rank: int
    rel_error: float


@dataclass
class MergeResult:
    """What a merge produced: the modules (in memory), where they were written, and the per-module report."""

    method: MergeMethod
    recipe: Recipe
    modules: list[OutputModule]
    reports: list[ModuleReport]
    config: dict
    dtype: torch.dtype
    seconds: float
    output: Path | None = None
    adapters: list[LoraAdapter] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.reports), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return sum(r.rel_error for r in self.reports) / max(len(self.reports), 1)

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules)

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules)

    def factors(self) -> dict[str, LoraFactors]:
        return {m.name: LoraFactors(A=m.A, B=m.B, kind=m.kind) for m in self.modules}

    def save(self, output: str | Path, *, force: bool = False) -> Path:
        """Write the merged adapter (config, weights, model card) atomically."""
        out = check_output_path(Path(output), force=force, inputs=[a.source.local_path for a in self.adapters])
        card = model_card(self)
        manifest = {
            "loramerge_version": __version__,
            "method": self.method.name,
            "recipe": json.loads(self.recipe.model_dump_json()),
            "inputs": [_input_record(a, e) for a, e in zip(self.adapters, self.recipe.adapters)],
            "modules": [vars(r) | {"input_ranks": list(r.input_ranks)} for r in self.reports],
        }
        write_adapter(
            out, self.modules, self.config, dtype=self.dtype, card=card, force=force,
            extra_files={"loramerge.json": json.dumps(manifest, indent=2) + "\n"},
            metadata={"loramerge_method": self.method.name, "loramerge_version": __version__},
        )
        self.output = out
        return out


def _input_record(adapter: LoraAdapter, entry: AdapterEntry) -> dict:
    return {
        "name": adapter.name, "source": adapter.source.reference, "revision": adapter.source.revision,
        "sha256": adapter.sha256, "weight": entry.weight, "base_model": adapter.base_model,
    }


def _unique_names(adapters: list[LoraAdapter], entries: list[AdapterEntry]) -> None:
    explicit = [e.name for e in entries if e.name]
    dup = [n for n, c in Counter(explicit).items() if c > 1]
    if dup:
        raise RecipeError(f"adapter name '{dup[0]}' is used twice", fix="give each adapter a distinct name")
    paths = Counter(a.source.local_path for a in adapters)
    twice = [p for p, c in paths.items() if c > 1]
    if twice:
        raise RecipeError("the same adapter is listed twice", path=str(twice[0]),
                          fix="list it once and raise its weight instead")
    seen: Counter[str] = Counter()
    for adapter in adapters:
        seen[adapter.name] += 1
        if seen[adapter.name] > 1:
            adapter.name = f"{adapter.name}-{seen[adapter.name]}"


def check_compatible(adapters: list[LoraAdapter], base_model: str | None) -> str | None:
    bases = {a.base_model for a in adapters if a.base_model}
    if base_model is None and len(bases) > 1:
        listing = "; ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(
            f"the adapters were trained on different base models ({listing})",
            fix="merge adapters of one base model; if these names denote the same weights, "
            "set base_model in the recipe to accept them",
        )
    resolved = base_model or (bases.pop() if bases else None)
    modules: dict[str, tuple[LoraAdapter, int, int, str]] = {}
    for adapter in adapters:
        for name, info in adapter.modules.items():
            if name not in modules:
                modules[name] = (adapter, info.d_in, info.d_out, info.kind)
                continue
            first, d_in, d_out, kind = modules[name]
            if (info.d_in, info.d_out, info.kind) != (d_in, d_out, kind):
                raise IncompatibleAdaptersError(
                    f"shape mismatch: '{first.name}' has {kind} {d_out}x{d_in}, "
                    f"'{adapter.name}' has {info.kind} {info.d_out}x{info.d_in}",
                    path=str(adapter.weights_path), module=name,
                    fix="these adapters belong to different base models; merge adapters of one base model",
                )
    return resolved


def target_modules_for(adapters: list[LoraAdapter], module_names: list[str]) -> list[str] | str:
    """The union of the inputs' target lists when they are plain lists, else the exact module names."""
    lists = [a.config.get("target_modules") for a in adapters]
    plain = all(isinstance(t, list) for t in lists) and not any(a.config.get("layers_to_transform") for a in adapters)
    if plain:
        return sorted({t for tl in lists for t in tl})
    return sorted(module_names)


def _output_dtype(name: str, adapters: list[LoraAdapter]) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    dtypes = {a.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _finish(result: Any, policy: RankPolicy, ranks: list[int], seed: int) -> Compressed:
    if isinstance(result, Dense):
        return compress_dense(result.delta, policy, ranks, seed=seed)
    return compress_factored(result.B, result.A, policy, ranks)


def run_merge(
    recipe: Recipe,
    *,
    device: str = "cpu",
    show_progress: bool = True,
    adapters: list[LoraAdapter] | None = None,
) -> MergeResult:
    """Merge in memory (the output is small: LoRA factors). ``MergeResult.save`` writes it."""
    started = time.perf_counter()
    method = get_method(recipe.method)
    cfg = method.make_config(recipe.parameters)
    fn = method.factorwise if recipe.factorwise else method.fn
    policy = method.fixed_rank if method.fixed_rank and recipe.rank == "auto" else recipe.rank_policy
    if method.fixed_rank and policy != method.fixed_rank:
        raise RecipeError(f"method '{method.name}' keeps rank {method.fixed_rank.describe()}; "
                          f"it cannot use rank {policy.describe()}",
                          fix="drop the rank key, or use task_arithmetic with a rank policy")
    if adapters is None:
        adapters = [load_adapter(e.path, name=e.name, revision=e.revision, allow_pickle=recipe.allow_pickle)
                    for e in recipe.adapters]
    _unique_names(adapters, list(recipe.adapters))
    base_model = check_compatible(adapters, recipe.base_model)
    weights = [e.weight for e in recipe.adapters]
    module_names = sorted({m for a in adapters for m in a.modules})

    def module_inputs(name: str, context: Any = None) -> ModuleInputs:
        present = [i for i, a in enumerate(adapters) if name in a.modules]
        return ModuleInputs(
            name=name, factors=tuple(adapters[i].factors(name, device=device) for i in present),
            weights=tuple(weights[i] for i in present),
            adapter_names=tuple(adapters[i].name for i in present), seed=recipe.seed, context=context,
        )

    context = None
    if method.prepare is not None and not recipe.factorwise:
        context = method.prepare(cfg, lambda: (module_inputs(n) for n in module_names))
    if method.needs_calibration:  # issue 11: calibration statistics (checked against these adapters) as the context
        from loramerge.data.statistics import statistics_for

        context = statistics_for(recipe, adapters, need=method.data, show_progress=show_progress)
    post = build_post(recipe.post, module_names)  # issue 11: `post: lines` (LiNeS) scales every merged delta
    out_modules: list[OutputModule] = []
    reports: list[ModuleReport] = []
    for name in progress_bar(module_names, description=f"merging ({method.name})", enabled=show_progress):
        inputs = module_inputs(name, context)
        factors = inputs.factors
        try:
            result = fn(cfg, inputs)
            result = post(name, result) if post is not None else result
        except ValueError as exc:
            raise RecipeError(f"method '{method.name}' failed: {exc}", module=name,
                              fix="change the adapters' weights or the method's parameters "
                              "(`loramerge methods` lists them)") from exc
        compressed = _finish(result, policy, inputs.ranks, derive_seed(recipe.seed, "compress", name))
        if not (torch.isfinite(compressed.A).all() and torch.isfinite(compressed.B).all()):
            raise NumericalError(f"method '{method.name}' produced NaN or Inf", module=name,
                                 fix="check the weights and parameters (e.g. a density of 0 or a huge lambda)")
        out_modules.append(OutputModule(name=name, kind=factors[0].kind, A=compressed.A.cpu(), B=compressed.B.cpu()))
        reports.append(ModuleReport(name=name, input_ranks=tuple(inputs.ranks), rank=compressed.rank,
                                    rel_error=compressed.rel_error))
    task_types = {a.config.get("task_type") for a in adapters}
    config = build_lora_config(
        out_modules, base_model=base_model, target_modules=target_modules_for(adapters, module_names),
        task_type=task_types.pop() if len(task_types) == 1 else None,
        fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
    )
    return MergeResult(
        method=method, recipe=recipe, modules=out_modules, reports=reports, config=config,
        dtype=_output_dtype(recipe.dtype, adapters), seconds=time.perf_counter() - started, adapters=adapters,
    )


def _as_recipe(
    recipe: Recipe | str | Path | dict | None, adapters: Iterable[Any] | None, method: str | None, overrides: dict
) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe.model_copy(update=overrides) if overrides else recipe
    if isinstance(recipe, (str, Path)):
        loaded = load_recipe(recipe)
        return parse_recipe({**loaded.model_dump(exclude_none=True), **overrides}) if overrides else loaded
    data = dict(recipe or {})
    if adapters is not None:
        data["adapters"] = [
            {"path": str(a)} if isinstance(a, (str, Path)) else dict(a) for a in adapters
        ]
    if method is not None:
        data["method"] = method
    data.update(overrides)
    if "method" not in data:
        raise RecipeError("no merge method given", fix="pass method='task_arithmetic' (or another registry name)")
    try:
        return parse_recipe(data)
    except ValidationError as exc:  # pragma: no cover - parse_recipe converts these
        raise RecipeError(str(exc)) from exc


def merge(
    recipe: Recipe | str | Path | dict | None = None,
    output: str | Path | None = None,
    *,
    adapters: Sequence[str | Path | dict] | None = None,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    force: bool = False,
    device: str = "cpu",
    show_progress: bool = False,
    **overrides: Any,
) -> MergeResult:
    """Merge LoRA adapters; write the result to ``output`` when given.

    ``merge("recipe.yaml", "out/")``, or
    ``merge(adapters=["a", "b"], method="ties", weights=[0.7, 0.3], parameters={"density": 0.3}, rank=16)``.
    """
    if weights is not None:
        if adapters is None:
            raise RecipeError("weights need adapters", fix="pass adapters=[...] with weights=[...]")
        if len(weights) != len(adapters):
            raise RecipeError(f"{len(weights)} weights for {len(adapters)} adapters", fix="give one weight per adapter")
        adapters = [{"path": str(a), "weight": w} if isinstance(a, (str, Path)) else {**a, "weight": w}
                    for a, w in zip(adapters, weights)]
    parsed = _as_recipe(recipe, adapters, method, overrides)
    if output is not None:
        inputs = [Path(e.path) for e in parsed.adapters if Path(e.path).exists()]
        check_output_path(Path(output), force=force, inputs=inputs)
    result = run_merge(parsed, device=device, show_progress=show_progress)
    if output is not None:
        result.save(output, force=force)
    return result


__all__ = ["MergeResult", "ModuleReport", "merge", "run_merge", "recipe_to_yaml"]
