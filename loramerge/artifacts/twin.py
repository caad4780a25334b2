"""Twin-Merging bundles (Lu et al., NeurIPS 2024, arXiv 2406.15479), in LoRA's own space.

A bundle holds a *shared* adapter (any registry merge; the paper's default is task arithmetic
with lambda 0.3) and, per task, its *exclusive* knowledge ``delta_t = dW_t - dW_shared`` compressed
by a truncated SVD. The residual is computed from the factors: it is the concatenated LoRA
``[B_t | -B_shared]``, ``[A_t; A_shared]``, whose SVD comes from ``factored_svd`` (QR + small SVD),
never a d_out x d_in matrix. At inference the paper mixes ``shared + sum_t w_t delta_t`` with
router weights ``w``; ``compose_twin`` gives that mix as one exact concatenated LoRA
(rank = shared rank + the residual ranks of the tasks with non-zero weight).

Layout of a bundle directory::

    twin.json                 manifest: tasks, sources, shared method, residual policy, errors
    shared/                   the shared adapter (a PEFT adapter)
    experts/<task>/           each task's residual (a PEFT adapter, scale 1: delta_t = B @ A)

Every part is an ordinary PEFT adapter, so a router can also load them with PEFT directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.artifacts.manifest import read_manifest
from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.core.adapter_set import AdapterLike, AdapterSet
from loramerge.core.dtypes import to_torch
from loramerge.core.factored import factored_svd
from loramerge.core.names import check_name, parse_weights
from loramerge.core.progress import progress_bar
from loramerge.errors import NumericalError, OutputError, RecipeError
from loramerge.io.writer import OutputModule, atomic_directory, build_lora_config, check_output_path, write_adapter
from loramerge.merging.engine import run_merge
from loramerge.merging.recipe import parse_recipe
from loramerge.version import __version__

TWIN_FORMAT = "loramerge-twin"
TWIN_FORMAT_VERSION = 1
MANIFEST_NAME = "twin.json"
SHARED_DIR = "shared"
EXPERTS_DIR = "experts"
DEFAULT_RESIDUAL_RANK = 8
"""The LoRA path of the reference code keeps rank 8 per residual."""



@dataclass(frozen=True)
class ResidualPolicy:
    """How many singular triplets of each residual to keep: a fixed rank, or a fraction of its numerical rank."""

    rank: int | None = None
    fraction: float | None = None

    @classmethod
    def from_options(cls, rank: int | None, fraction: float | None) -> ResidualPolicy:
        if rank is not None and fraction is not None:
            raise RecipeError("give residual_rank or residual_fraction, not both",
                              fix="drop one of --residual-rank / --residual-fraction")
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise RecipeError(f"residual_fraction must be in (0, 1], got {fraction}",
                                  fix="e.g. 0.1 keeps 10% of each residual's rank; 1.0 keeps it exactly")
            return cls(fraction=float(fraction))
        rank = DEFAULT_RESIDUAL_RANK if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise RecipeError(f"residual_rank must be a positive integer, got {rank!r}", fix="e.g. 8 (the paper's LoRA path)")
        return cls(rank=rank)

    def keep(self, numerical_rank: int) -> int:
        if self.fraction is not None:
            return min(numerical_rank, max(1, math.ceil(self.fraction * numerical_rank)))
        return min(numerical_rank, self.rank)  # type: ignore[type-var]

    def describe(self) -> dict:
        return {"rank": self.rank} if self.rank is not None else {"fraction": self.fraction}


@dataclass(frozen=True)
class Residual:
    """One task's compressed residual on one module, with the share of its energy the truncation lost."""

    B: torch.Tensor
    A: torch.Tensor
    rel_error: float
    norm: float


def compress_residual(task: LoraFactors | None, shared: LoraFactors, policy: ResidualPolicy) -> Residual:
    """``dW_task - dW_shared`` truncated by the policy, from the factors (a missing task module is zero)."""
    if task is None:
        B_cat, A_cat = -shared.B, shared.A
    else:
        B_cat = torch.cat([task.B.float(), -shared.B.float()], dim=1)
        A_cat = torch.cat([task.A.float(), shared.A.float()], dim=0)
    U, S, Vh = factored_svd(B_cat.float(), A_cat.float())
    total = float((S.double() ** 2).sum())
    if S.numel() == 0 or total == 0.0:  # the task equals the shared adapter here: keep one zero unit
        return Residual(B=torch.zeros(shared.d_out, 1), A=torch.zeros(1, shared.d_in), rel_error=0.0, norm=0.0)
    k = policy.keep(S.numel())
    lost = float((S[k:].double() ** 2).sum())
    root = S[:k].sqrt()
    return Residual(B=U[:, :k] * root, A=root[:, None] * Vh[:k], rel_error=math.sqrt(lost / total),
                    norm=math.sqrt(total))


# ---------------------------------------------------------------------------------------------------------------------
# The bundle on disk
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StackedModule:
    """One module as the gated concatenated LoRA ``[B_shared | B_1 | ...]``, ``[A_shared; A_1; ...]``.

    ``segments`` maps "shared" and each task name to its slice of the rank dimension, so a
    router's gate c (1 on the shared slice, w_t on task t's) gives ``B (c * (A x))``.
    """

    B: torch.Tensor
    A: torch.Tensor
    segments: dict[str, slice]


@dataclass
class TwinBundle:
    """A Twin-Merging bundle opened for reading; factors stream from the adapters on demand."""

    path: Path
    manifest: dict
    shared: LoraAdapter
    residuals: dict[str, LoraAdapter]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def module_names(self) -> list[str]:
        return sorted(self.shared.modules)

    def check_task(self, task: str) -> None:
        if task not in self.residuals:
            raise RecipeError(f"unknown task '{task}' in the twin bundle", path=str(self.path),
                              fix=f"use one of: {', '.join(self.task_names)}")

    def shared_factors(self, module: str) -> LoraFactors:
        return self.shared.factors(module)

    def residual_factors(self, task: str, module: str) -> LoraFactors:
        """Task ``task``'s compressed exclusive delta on ``module`` (delta_t = B @ A)."""
        self.check_task(task)
        return self.residuals[task].factors(module)

    def stacked(self, module: str, tasks: Sequence[str] | None = None) -> StackedModule:
        """The shared and residual factors of ``module`` side by side, for a gated (routed) forward."""
        tasks = list(tasks) if tasks is not None else self.task_names
        parts = [("shared", self.shared_factors(module))] + [(t, self.residual_factors(t, module)) for t in tasks]
        segments, start = {}, 0
        for name, f in parts:
            segments[name] = slice(start, start + f.rank)
            start += f.rank
        return StackedModule(B=torch.cat([f.B for _, f in parts], dim=1), A=torch.cat([f.A for _, f in parts], dim=0),
                             segments=segments)


def load_twin(path: str | Path) -> TwinBundle:
    """Open a bundle directory written by ``build_twin``."""
    path = Path(path).expanduser()
    manifest = read_manifest(path, MANIFEST_NAME, TWIN_FORMAT, TWIN_FORMAT_VERSION, what="twin bundle",
                             verb="twin build")
    shared = load_adapter(path / SHARED_DIR, name="shared")
    residuals = {t["name"]: load_adapter(path / EXPERTS_DIR / t["name"], name=t["name"]) for t in manifest["tasks"]}
    return TwinBundle(path=path.resolve(), manifest=manifest, shared=shared, residuals=residuals)


def _check_names(tasks: AdapterSet) -> None:
    for adapter in tasks:
        check_name(adapter.name, "task", reserved=(SHARED_DIR,))


def build_twin(
    adapters: Sequence[AdapterLike] | AdapterSet,
    out_dir: str | Path,
    *,
    shared_method: str = "task_arithmetic",
    shared_parameters: Mapping[str, Any] | None = None,
    residual_rank: int | None = None,
    residual_fraction: float | None = None,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    shared_rank: str | int | dict | None = None,
    seed: int = 0,
    dtype: str = "auto",
    force: bool = False,
    show_progress: bool = False,
) -> TwinBundle:
    """Build a Twin-Merging bundle: the shared merge plus each task's SVD-compressed residual.

    ``shared_parameters`` default to ``{"lambda": 0.3}`` for task arithmetic (the paper's), else
    none. The residual keeps ``residual_rank`` triplets (default 8) or ``residual_fraction`` of its
    numerical rank (1.0 keeps it exactly, so shared + residual_t is task t's own delta).
    """
    policy = ResidualPolicy.from_options(residual_rank, residual_fraction)
    if shared_parameters is None:
        shared_parameters = {"lambda": 0.3} if shared_method in ("task_arithmetic", "linear") else {}
    tasks = adapters if isinstance(adapters, AdapterSet) and names is None else AdapterSet.open(list(adapters), names=names)
    _check_names(tasks)
    if weights is not None and len(weights) != len(tasks):
        raise RecipeError(f"{len(weights)} weights for {len(tasks)} adapters", fix="give one weight per adapter")
    recipe_data: dict[str, Any] = {
        "method": shared_method, "parameters": dict(shared_parameters), "seed": seed, "dtype": dtype,
        "adapters": [{"path": str(a.source.local_path), "name": a.name,
                      "weight": 1.0 if weights is None else float(w)}
                     for a, w in zip(tasks, weights if weights is not None else [1.0] * len(tasks), strict=True)],
    }
    if shared_rank is not None:
        recipe_data["rank"] = shared_rank
    recipe = parse_recipe(recipe_data, source="twin shared merge")
    out = check_output_path(Path(out_dir), force=force, inputs=[a.source.local_path for a in tasks])
    shared = run_merge(recipe, show_progress=show_progress, adapters=tasks)
    residuals: dict[str, list[OutputModule]] = {a.name: [] for a in tasks}
    err_sq = {a.name: 0.0 for a in tasks}
    norm_sq = {a.name: 0.0 for a in tasks}
    for module in progress_bar(shared.modules, description="twin residuals", enabled=show_progress):
        shared_f = LoraFactors(A=module.A.float(), B=module.B.float(), kind=module.kind)
        for adapter in tasks:
            task_f = adapter.factors(module.name) if module.name in adapter.modules else None
            res = compress_residual(task_f, shared_f, policy)
            if not (torch.isfinite(res.A).all() and torch.isfinite(res.B).all()):
                raise NumericalError("the residual SVD produced NaN or Inf", module=module.name,
                                     path=str(adapter.weights_path), fix="check the adapter and the shared merge")
            residuals[adapter.name].append(OutputModule(name=module.name, kind=module.kind, A=res.A, B=res.B))
            err_sq[adapter.name] += (res.rel_error * res.norm) ** 2
            norm_sq[adapter.name] += res.norm ** 2
    manifest = {
        "format": TWIN_FORMAT, "format_version": TWIN_FORMAT_VERSION, "loramerge_version": __version__,
        "paper": "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging (Lu et al., NeurIPS 2024)",
        "url": "https://arxiv.org/abs/2406.15479",
        "base_model": shared.config.get("base_model_name_or_path"),
        "shared": {"method": shared.method.name, "parameters": dict(shared_parameters), "seed": seed,
                   "rank": shared.recipe.rank_policy.describe(), "total_rank": shared.total_rank},
        "residual": policy.describe(),
        "tasks": [{
            "name": a.name, "source": a.source.reference, "sha256": a.sha256,
            "weight": 1.0 if weights is None else float(weights[i]),
            "residual_total_rank": sum(m.rank for m in residuals[a.name]),
            "residual_rel_error": math.sqrt(err_sq[a.name] / norm_sq[a.name]) if norm_sq[a.name] > 0 else 0.0,
        } for i, a in enumerate(tasks)],
    }
    _write_bundle(out, shared, residuals, manifest, force)
    return load_twin(out)


def _write_bundle(out: Path, shared: Any, residuals: dict[str, list[OutputModule]], manifest: dict, force: bool) -> None:
    try:
        with atomic_directory(out, force=force) as tmp:
            shared.save(tmp / SHARED_DIR)
            for name, modules in residuals.items():
                config = build_lora_config(modules, base_model=shared.config.get("base_model_name_or_path"),
                                           target_modules=shared.config["target_modules"],
                                           task_type=shared.config.get("task_type"),
                                           fan_in_fan_out=shared.config.get("fan_in_fan_out", False))
                write_adapter(tmp / EXPERTS_DIR / name, modules, config, dtype=shared.dtype,
                              metadata={"loramerge_artifact": "twin-residual", "loramerge_version": __version__})
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"could not write the twin bundle: {exc}", path=str(out),
                          fix="check free disk space and permissions; nothing was changed at the output path") from exc


# ---------------------------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------------------------

def _check_weights(bundle: TwinBundle, weights: Mapping[str, float]) -> dict[str, float]:
    for task, w in weights.items():
        bundle.check_task(task)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise RecipeError(f"weight of task '{task}' must be a finite number, got {w!r}", fix="e.g. 0.7")
    return {t: float(weights[t]) for t in bundle.task_names if weights.get(t, 0.0) != 0.0}


def compose_twin(bundle: TwinBundle | str | Path, weights: Mapping[str, float]) -> list[OutputModule]:
    """``shared + sum_t w_t residual_t`` per module, as the exact concatenated LoRA.

    Tasks missing from ``weights`` (or with weight 0) add nothing and no rank.
    """
    if not isinstance(bundle, TwinBundle):
        bundle = load_twin(bundle)
    active = _check_weights(bundle, weights)
    out = []
    for module in bundle.module_names:
        parts = [(bundle.shared_factors(module), 1.0)] + [(bundle.residual_factors(t, module), w)
                                                          for t, w in active.items()]
        B = torch.cat([w * f.B for f, w in parts], dim=1)
        A = torch.cat([f.A for f, _ in parts], dim=0)
        out.append(OutputModule(name=module, kind=parts[0][0].kind, A=A, B=B))
    return out


def write_composed(bundle_dir: str | Path, weights: Mapping[str, float], out_dir: str | Path, *,
                   force: bool = False, dtype: str | None = None) -> Path:
    """Compose the bundle with ``weights`` and write the result as a PEFT adapter."""
    bundle = load_twin(bundle_dir)
    active = _check_weights(bundle, weights)
    out_dtype = to_torch(dtype) if dtype else bundle.shared.dtype
    out = check_output_path(Path(out_dir), force=force, inputs=[bundle.path])
    modules = compose_twin(bundle, weights)
    shared_cfg = bundle.shared.config
    config = build_lora_config(modules, base_model=shared_cfg.get("base_model_name_or_path"),
                               target_modules=shared_cfg["target_modules"], task_type=shared_cfg.get("task_type"),
                               fan_in_fan_out=shared_cfg.get("fan_in_fan_out", False))
    mix = ", ".join(f"{t}={w:g}" for t, w in active.items()) or "(shared only)"
    card = "\n".join([
        "---", "library_name: peft", "tags: [loramerge, lora, twin-merging]", "---", "",
        "# Twin-Merging composition", "",
        f"shared + sum_t w_t residual_t with weights {mix}, from the bundle `{bundle.path}` "
        f"(shared: {bundle.manifest['shared']['method']}), made with loramerge {__version__}.", "",
    ])
    provenance = {"loramerge_version": __version__, "bundle": str(bundle.path), "weights": active,
                  "tasks": bundle.manifest["tasks"], "shared": bundle.manifest["shared"]}
    write_adapter(out, modules, config, dtype=out_dtype, card=card,
                  extra_files={"loramerge.json": json.dumps(provenance, indent=2) + "\n"},
                  metadata={"loramerge_artifact": "twin-composed", "loramerge_version": __version__}, force=force)
    return out


__all__ = [
    "ResidualPolicy", "StackedModule", "TwinBundle", "build_twin", "compose_twin", "compress_residual",
    "load_twin", "parse_weights", "write_composed",
]


def task_factors(bundle_dir: str | Path, task: str) -> dict[str, LoraFactors]:
    """What a twin bundle runs for ``task`` alone: shared + that task's expert, module -> factors (exact).

    The serving seam (``twin:BUNDLE/task``). Raises KeyError for a task the bundle does not hold.
    """
    bundle = load_twin(bundle_dir)
    if task not in bundle.task_names:
        raise KeyError(task)
    return {m.name: LoraFactors(A=m.A, B=m.B, kind=m.kind) for m in compose_twin(bundle, {task: 1.0})}
