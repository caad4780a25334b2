"""The one merge engine: stream the modules of an AdapterSet through a method and the rank policy.

``merge_modules`` is the single driver. ``run_merge`` / ``merge`` (the API and the CLI), ``compare``,
``twin build`` (its shared adapter) and the serving composer call it; nothing else loops over modules
applying a method. Writing a result is I/O's job (``loramerge.io.merged``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from loramerge.core.adapter import LoraAdapter, LoraFactors
from loramerge.core.adapter_set import AdapterSet, check_compatible, target_modules_for
from loramerge.core.factored import Compressed, RankPolicy, compress_dense, compress_factored
from loramerge.core.ops import derive_seed
from loramerge.core.progress import progress_bar
from loramerge.errors import NumericalError, RecipeError
from loramerge.io.bake import DeltaSource
from loramerge.io.writer import OutputModule, check_output_path
from loramerge.merging.methods import Dense, MergeMethod, MethodConfig, ModuleInputs, get_method
from loramerge.merging.methods.catalog import FACTORWISE_METHODS
from loramerge.merging.methods.core_space import method_function
from loramerge.merging.recipe import Recipe, load_recipe, parse_recipe, recipe_to_yaml

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModuleReport:
    name: str
    input_ranks: tuple[int, ...]
    rank: int
    rel_error: float


@dataclass(frozen=True)
class MergePlan:
    """What to do to every module: a method with its config, the adapters' weights, the rank policy."""

    method: MergeMethod
    config: MethodConfig
    weights: tuple[float, ...]
    policy: RankPolicy
    factorwise: bool = False
    seed: int = 0
    space: str = "dense"
    """``dense`` (the delta's own coordinates) or ``core`` (the shared-basis core matrices, arXiv 2509.17786)."""
    context: Any = None
    """Given to every module as ``ModuleInputs.context`` instead of a ``prepare`` pass: the calibration
    statistics of a data-informed method (issue 11; ``run_merge`` builds them from the recipe)."""
    post: Any = None
    """A step applied to every merged delta before the rank policy, ``(module, result) -> result``: the
    recipe's ``post: lines`` (LiNeS, issue 11)."""

    @classmethod
    def build(cls, method: str, weights: Sequence[float], *, parameters: dict | None = None,
              rank: RankPolicy | str | int | dict = "auto", factorwise: bool = False, seed: int = 0,
              space: str = "dense") -> MergePlan:
        """Resolve ``method`` in the registry, validate its parameters and the rank policy."""
        entry = get_method(method)
        try:
            config = entry.make_config(parameters)
        except ValidationError as exc:
            raise RecipeError(f"bad parameters for method '{entry.name}': {exc}",
                              fix="`loramerge methods NAME` lists the method's parameters") from None
        if factorwise and entry.factorwise is None:
            raise RecipeError(f"method '{entry.name}' has no factorwise (PEFT) variant",
                              fix=f"factorwise works with {', '.join(FACTORWISE_METHODS)}")
        method_function(entry, space, factorwise=factorwise)  # refuses a space the method does not support
        policy = RankPolicy.parse(rank)
        if entry.fixed_rank is not None:
            if policy.kind == "auto":
                policy = entry.fixed_rank
            elif policy != entry.fixed_rank:
                raise RecipeError(f"method '{entry.name}' keeps rank {entry.fixed_rank.describe()}; "
                                  f"it cannot use rank {policy.describe()}",
                                  fix="drop the rank key, or use task_arithmetic with a rank policy")
        return cls(method=entry, config=config, weights=tuple(float(w) for w in weights), policy=policy,
                   factorwise=factorwise, seed=seed, space=space)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> MergePlan:
        return cls.build(recipe.method, [e.weight for e in recipe.adapters], parameters=recipe.parameters,
                         rank=recipe.rank, factorwise=recipe.factorwise, seed=recipe.seed,
                         space=recipe.space)


@dataclass(frozen=True)
class MergedModule:
    """One output module and its report (input ranks, kept rank, relative error of the rank policy)."""

    module: OutputModule
    report: ModuleReport


def module_inputs(adapters: AdapterSet, plan: MergePlan, name: str, *, device: str | torch.device = "cpu",
                  context: Any = None) -> ModuleInputs:
    """What the method sees for module ``name``: every adapter's factors, in the set's order.

    An adapter that lacks the module is a ZERO task vector there (model-soup semantics), given to the
    method as rank-0 factors, so that normalising methods (average, ``normalize: true``, STAR, LEGO's norm)
    divide by all the weights, not only by the weights of the adapters that have the module.
    """
    present = set(adapters.present(name))
    loaded = {i: adapters[i].factors(name, device=device) for i in sorted(present)}
    first = next(iter(loaded.values()))
    absent = LoraFactors(A=first.A.new_zeros(0, first.d_in), B=first.B.new_zeros(first.d_out, 0), kind=first.kind)
    return ModuleInputs(
        name=name, factors=tuple(loaded.get(i, absent) for i in range(len(adapters))),
        weights=tuple(plan.weights), adapter_names=tuple(a.name for a in adapters), seed=plan.seed, context=context,
    )


def _check_finite_result(result: Any, inputs: ModuleInputs, method: str) -> None:
    """NaN/Inf out of a method (an overflow, e.g. a huge weight) is a NumericalError naming the recipe entries whose
    weighted delta overflows on its own, before the rank policy's SVD fails on it with a linear-algebra error."""
    import torch

    values = (result.delta,) if isinstance(result, Dense) else (result.B, result.A)
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise _overflow_error(inputs, method, "it produced NaN or Inf")


def _overflow_error(inputs: ModuleInputs, method: str, what: str) -> NumericalError:
    """Name the recipe entry with the largest weighted delta (the one that overflows, or the largest of a sum)."""
    sizes = {n: abs(w) * float(f.B.abs().amax()) * float(f.A.abs().amax()) * f.rank
             for f, w, n in zip(inputs.factors, inputs.weights, inputs.adapter_names) if f.rank}
    worst = max(sizes, key=lambda n: sizes[n])
    weight = inputs.weights[inputs.adapter_names.index(worst)]
    return NumericalError(f"method '{method}': {what}: recipe entry '{worst}' (weight {weight:g}) has the largest "
                          "weighted delta", module=inputs.name,
                          fix=f"lower the weight of '{worst}' (or lambda); weighted deltas must stay well inside float32")


def _finish(result: Any, policy: RankPolicy, ranks: list[int], seed: int) -> Compressed:
    if isinstance(result, Dense):
        return compress_dense(result.delta, policy, ranks, seed=seed, basis=result.basis)
    return compress_factored(result.B, result.A, policy, ranks)


def merge_modules(
    adapters: AdapterSet,
    plan: MergePlan,
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    context: Any = None,
) -> Iterator[MergedModule]:
    """Merge module by module (natural order), yielding each output module with its report.

    Runs the method's ``prepare`` pass (global statistics) first when it has one. Only one module's
    factors are in memory at a time. ``modules``: a subset of ``adapters.module_names``. ``context``: what
    the method reads instead of a ``prepare`` pass (calibration statistics for the data-informed methods).
    """
    if len(plan.weights) != len(adapters):
        raise RecipeError(f"{len(plan.weights)} weights for {len(adapters)} adapters", fix="give one weight per adapter")
    method = plan.method
    fn = method_function(method, plan.space, factorwise=plan.factorwise)
    names = list(adapters.module_names if modules is None else modules)
    context = context if context is not None else plan.context
    if context is None and method.prepare is not None and not plan.factorwise:
        context = method.prepare(plan.config, lambda: (module_inputs(adapters, plan, n, device=device) for n in names))

    def inputs_of(name: str) -> ModuleInputs:
        return module_inputs(adapters, plan, name, device=device, context=context)

    workers = _process_workers(adapters, plan, names, device)
    if workers > 1:
        from loramerge.core.processes import ordered_map

        computed: Iterator = ordered_map(_compute_remotely, (_job(plan, inputs_of(n)) for n in names), workers)
    else:
        computed = (None for _ in names)
    for name, remote in zip(progress_bar(names, description=f"merging ({method.name})", enabled=show_progress),
                            computed):
        if remote is not None:
            ranks, compressed = remote
        else:  # computed here (always so for a module a worker failed on: the error is raised here, in full)
            inputs = inputs_of(name)
            ranks, compressed = inputs.ranks, _merge_one(fn, method.name, plan, inputs)
        kind = adapters.info(name).kind
        yield MergedModule(
            module=OutputModule(name=name, kind=kind, A=compressed.A.cpu(), B=compressed.B.cpu()),
            report=ModuleReport(name=name, input_ranks=tuple(ranks), rank=compressed.rank,
                                rel_error=compressed.rel_error),
        )


def _merge_one(fn: Any, method_name: str, plan: MergePlan | _ModuleJob, inputs: ModuleInputs) -> Compressed:
    """One module: the method, the post-step, the checks, the rank policy (``plan``: its config, post-step,
    rank policy and seed)."""
    import torch

    name = inputs.name
    try:
        result = fn(plan.config, inputs)
        result = plan.post(name, result) if plan.post is not None else result
    except ValueError as exc:
        raise RecipeError(f"method '{method_name}' failed: {exc}", module=name,
                          fix="change the adapters' weights or the method's parameters "
                          "(`loramerge methods` lists them)") from exc
    _check_finite_result(result, inputs, method_name)
    try:
        compressed = _finish(result, plan.policy, inputs.ranks, derive_seed(plan.seed, "compress", name))
    except torch.linalg.LinAlgError as exc:  # finite but so large that the SVD's products overflow
        raise _overflow_error(inputs, method_name, "its rank reduction overflowed") from exc
    if not (torch.isfinite(compressed.A).all() and torch.isfinite(compressed.B).all()):
        raise NumericalError(f"method '{method_name}' produced NaN or Inf", module=name,
                             fix="check the weights and parameters (e.g. a density of 0 or a huge lambda)")
    return compressed


PROCESS_MIN_ENTRIES = 1 << 25
"""Adapter entries (N x d_out x d_in) of the largest module from which a CPU element-wise merge runs its modules
in worker processes (``core/processes.py``): about 1 s of work per module, against ~2 s to start the workers once."""


@dataclass(frozen=True)
class _ModuleJob:
    """What a worker process needs for one module; it pickles (a built-in method's function by its reference)."""

    fn: Any
    method_name: str
    config: MethodConfig
    inputs: ModuleInputs
    policy: RankPolicy
    seed: int
    post: None = None
    """Always None: plans with a post-step are merged in this process (``_merge_one`` reads the field)."""


def _process_workers(adapters: AdapterSet, plan: MergePlan, names: Sequence[str], device: Any) -> int:
    """Worker processes for this merge: only for built-in element-wise methods in dense space on the CPU (no
    calibration context, no post-step, no prepare pass), on modules large enough to pay for starting them."""
    import torch

    from loramerge.core.processes import process_workers
    from loramerge.merging.methods import Ref

    method = plan.method
    if (torch.device(device).type != "cpu" or method.kind != "elementwise" or plan.space != "dense"
            or plan.factorwise or plan.post is not None or plan.context is not None or method.prepare is not None
            or not isinstance(method.fn, Ref) or not names):
        return 1
    workers = process_workers()
    if workers <= 1:
        return 1
    largest = max(adapters.info(n).d_out * adapters.info(n).d_in for n in names)
    return workers if largest * len(adapters) >= PROCESS_MIN_ENTRIES else 1


def _job(plan: MergePlan, inputs: ModuleInputs) -> _ModuleJob:
    from loramerge.merging.methods import Ref

    ref = plan.method.fn
    return _ModuleJob(Ref(ref.target, *ref.args), plan.method.name, plan.config, inputs, plan.policy, plan.seed)


def _compute_remotely(job: _ModuleJob) -> tuple[list[int], Compressed] | None:
    """In a worker: the module merged; None when it raised, so that the parent computes it again and raises the
    error there with its full context (errors with keyword fields do not survive pickling)."""
    try:
        return job.inputs.ranks, _merge_one(job.fn, job.method_name, job, job.inputs)
    except Exception:  # noqa: BLE001 - recomputed (and raised) by the parent
        return None


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
    adapter_set: AdapterSet | None = None

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
    def rank_range(self) -> tuple[int, int]:
        ranks = [m.rank for m in self.modules]
        return (min(ranks), max(ranks)) if ranks else (0, 0)

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules)

    def factors(self) -> dict[str, LoraFactors]:
        return {m.name: LoraFactors(A=m.A, B=m.B, kind=m.kind) for m in self.modules}

    def delta_source(self) -> DeltaSource:
        """What ``bake`` reads from this merge: its factors (scale folded into B) and where they came from."""
        factors = self.factors()
        return DeltaSource(
            kinds={n: f.kind for n, f in factors.items()}, read=factors.__getitem__,
            fan_in_fan_out=bool(self.config.get("fan_in_fan_out")),
            inputs=[a.source.local_path for a in self.adapters] + ([self.output] if self.output else []),
            label=f"{self.method.name} merge of {', '.join(a.name for a in self.adapters)}",
            base_model=self.config.get("base_model_name_or_path"),
        )

    def save(self, output: str | Path, *, force: bool = False) -> Path:
        """Write the merged adapter atomically (kept for the API; the work is ``loramerge.io.merged.save``)."""
        from loramerge.io.merged import save

        return save(self, output, force=force)


def run_merge(
    recipe: Recipe,
    *,
    device: str = "cpu",
    show_progress: bool = True,
    adapters: AdapterSet | Sequence[LoraAdapter] | None = None,
) -> MergeResult:
    """Merge in memory (the output is small: LoRA factors). ``MergeResult.save`` writes it."""
    started = time.perf_counter()
    plan = MergePlan.from_recipe(recipe)
    names = [e.name for e in recipe.adapters]
    if adapters is None:
        adapters = AdapterSet.open([e.path for e in recipe.adapters], names=names,
                                   revisions=[e.revision for e in recipe.adapters],
                                   allow_pickle=recipe.allow_pickle, base_model=recipe.base_model)
    elif not isinstance(adapters, AdapterSet):
        adapters = AdapterSet.of(adapters, names=names, base_model=recipe.base_model)
    plan = _with_data(plan, recipe, adapters, show_progress)
    merged = list(merge_modules(adapters, plan, device=device, show_progress=show_progress))
    out_modules = [m.module for m in merged]
    from loramerge.core.dtypes import to_torch

    dtype = adapters.dtype if recipe.dtype == "auto" else to_torch(recipe.dtype)
    return MergeResult(
        method=plan.method, recipe=recipe, modules=out_modules, reports=[m.report for m in merged],
        config=adapters.lora_config(out_modules, base_model=recipe.base_model), dtype=dtype,
        seconds=time.perf_counter() - started, adapters=list(adapters), adapter_set=adapters,
    )


def _with_data(plan: MergePlan, recipe: Recipe, adapters: AdapterSet, show_progress: bool) -> MergePlan:
    """Issue 11: the calibration statistics of a data-informed method (checked against these adapters, refused
    when stale) and the recipe's post-step, attached to the plan."""
    from dataclasses import replace

    from loramerge.merging.recipe import NEEDS_STATISTICS

    if plan.method.data in NEEDS_STATISTICS:
        from loramerge.data.statistics import statistics_for

        plan = replace(plan, context=statistics_for(recipe, list(adapters), need=plan.method.data,
                                                    show_progress=show_progress, config=plan.config))
    if recipe.post is not None:
        from loramerge.merging.methods.lines import build_post

        plan = replace(plan, post=build_post(recipe.post, list(adapters.module_names)))
    return plan


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


# Kept for callers of the old names (one release): the checks live in loramerge.core.adapter_set.
__all__ = [
    "MergePlan", "MergeResult", "MergedModule", "ModuleReport", "check_compatible", "merge", "merge_modules",
    "module_inputs", "recipe_to_yaml", "run_merge", "target_modules_for",
]
