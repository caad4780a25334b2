"""Reversible basis merging (RMM; Alipour & Amiri, arXiv 2510.14163): a basis of k factor sets plus
per-task coefficients, from which any task's adapter is rebuilt on demand.

Per module, each task's delta is first put in its canonical factor form (the gauge
``(B G, G^-1 A)`` makes raw factors of different adapters incomparable):
``B = U S^1/2``, ``A = S^1/2 V^T`` from the factored SVD, each column of U signed so its
largest-magnitude entry is positive, zero-padded to the module's largest rank r. Then, per
factor, the tasks' factors are stacked as the columns of X and X's truncated SVD gives the
Frobenius-optimal rank-k basis and coefficients (Eckart-Young; optionally after removing the
mean task):

- ``granularity="module"``: one basis over the whole factor (X is (P r) x N, P = d_out for B
  and d_in for A): k basis factor sets and a k-vector of coefficients per task and factor.
- ``granularity="row"``: one basis per row of B / column of A (X is r x N at each position):
  more coefficients, smaller error.

k = N reconstructs every task exactly; k < N reaches the best rank-k (PCA) error of each factor.
Nothing of size d_out x d_in is formed: the SVDs are of the factors, and the reconstruction
error of the product is measured from the factors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from loramerge.artifacts.manifest import read_manifest
from loramerge.core.adapter import LoraAdapter, LoraFactors, ModuleKind
from loramerge.core.adapter_set import AdapterLike, AdapterSet, target_modules_for
from loramerge.core.dtypes import dtype_name, to_torch
from loramerge.core.factored import factored_svd
from loramerge.core.progress import progress_bar
from loramerge.errors import AdapterLoadError, OutputError, RecipeError
from loramerge.io.writer import OutputModule, atomic_directory, build_lora_config, check_output_path, write_adapter
from loramerge.version import __version__

Granularity = Literal["module", "row"]

BASIS_FORMAT = "loramerge-basis"
BASIS_FORMAT_VERSION = 1
MANIFEST_NAME = "basis.json"
WEIGHTS_NAME = "basis.safetensors"
_WORK = torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# The math: canonical factors, PCA of stacked factors, product error from factors
# ---------------------------------------------------------------------------------------------------------------------

def canonical_factors(factors: LoraFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gauge-fixed SVD form (B = U S^1/2, A = S^1/2 V^T), signed and zero-padded to ``rank`` units."""
    U, S, Vh = factored_svd(factors.B.to(_WORK), factors.A.to(_WORK))
    U, S, Vh = U.to(_WORK), S.to(_WORK), Vh.to(_WORK)
    if U.shape[1]:
        pivot = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).squeeze(0)
        sign = torch.where(pivot < 0, -1.0, 1.0).to(_WORK)
        U, Vh = U * sign, Vh * sign[:, None]
    root = S.sqrt()
    B = torch.zeros(factors.d_out, rank, dtype=_WORK)
    A = torch.zeros(rank, factors.d_in, dtype=_WORK)
    n = min(rank, S.numel())
    B[:, :n] = U[:, :n] * root[:n]
    A[:n] = root[:n, None] * Vh[:n]
    return B, A


def _sign_columns(basis: torch.Tensor, coef: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign each basis vector (along ``dim`` of ``basis``) so its largest entry is positive; flip coef to match."""
    pivot = basis.gather(dim, basis.abs().argmax(dim=dim, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(basis.dtype)
    return basis * sign, coef * sign.transpose(-1, -2) if coef.dim() == 3 else coef * sign.reshape(1, -1)


@dataclass(frozen=True)
class FactorPCA:
    """A rank-k basis for one factor (as a P x r matrix: B, or A^T) of N tasks, and their coefficients.

    module granularity: ``basis`` (k, P, r), ``coef`` (N, k).
    row granularity:    ``basis`` (P, r, k), ``coef`` (P, k, N).
    ``mean`` (P, r) is the removed mean task when centred, else None.
    """

    granularity: Granularity
    basis: torch.Tensor
    coef: torch.Tensor
    mean: torch.Tensor | None

    @property
    def k(self) -> int:
        return self.basis.shape[0] if self.granularity == "module" else self.basis.shape[2]

    def reconstruct(self, task: int) -> torch.Tensor:
        """Task ``task``'s factor (P x r)."""
        if self.granularity == "module":
            out = torch.einsum("k,kpr->pr", self.coef[task].to(_WORK), self.basis.to(_WORK))
        else:
            out = (self.basis.to(_WORK) @ self.coef[:, :, task:task + 1].to(_WORK)).squeeze(-1)
        return out + self.mean.to(_WORK) if self.mean is not None else out

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.basis": self.basis, f"{prefix}.coef": self.coef}
        if self.mean is not None:
            out[f"{prefix}.mean"] = self.mean
        return out

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors("").values())

    def to(self, dtype: torch.dtype) -> FactorPCA:
        mean = self.mean.to(dtype) if self.mean is not None else None
        return FactorPCA(self.granularity, self.basis.to(dtype), self.coef.to(dtype), mean)


def fit_factor_pca(X: torch.Tensor, k: int, granularity: Granularity, center: bool) -> FactorPCA:
    """The truncated-SVD basis of N stacked factors ``X`` (N, P, r) at rank ``k`` (Eckart-Young)."""
    N, P, r = X.shape
    X = X.to(_WORK)
    if granularity == "module":
        flat = X.reshape(N, P * r).T  # (D, N): one column per task
        mean = flat.mean(dim=1, keepdim=True) if center else None
        U, S, Vh = torch.linalg.svd(flat - mean if mean is not None else flat, full_matrices=False)
        keep = min(k, S.numel())
        basis, coef = U[:, :keep], (S[:keep, None] * Vh[:keep]).T  # (D, keep), (N, keep)
        basis, coef = _sign_columns(basis, coef, dim=0)
        return FactorPCA(granularity, basis.T.reshape(keep, P, r), coef,
                         mean.reshape(P, r) if mean is not None else None)
    per_row = X.permute(1, 2, 0)  # (P, r, N): one r x N problem per position
    mean = per_row.mean(dim=2, keepdim=True) if center else None
    U, S, Vh = torch.linalg.svd(per_row - mean if mean is not None else per_row, full_matrices=False)
    keep = min(k, S.shape[1])
    basis, coef = U[:, :, :keep], S[:, :keep, None] * Vh[:, :keep, :]  # (P, r, keep), (P, keep, N)
    basis, coef = _sign_columns(basis, coef, dim=1)
    return FactorPCA(granularity, basis, coef, mean.squeeze(2) if mean is not None else None)


def product_error(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``|B1 A1 - B2 A2|_F`` from the factors (the difference is the concatenation [B1 | -B2], [A1; A2])."""
    B = torch.cat([B1.to(_WORK), -B2.to(_WORK)], dim=1)
    A = torch.cat([A1.to(_WORK), A2.to(_WORK)], dim=0)
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def _delta_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    B, A = B.to(_WORK), A.to(_WORK)
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BasisModule:
    """One module's basis: B (as d_out x r) and A (as A^T, d_in x r) each with its own PCA."""

    name: str
    kind: ModuleKind
    B: FactorPCA
    A: FactorPCA

    def task_factors(self, task: int) -> LoraFactors:
        return LoraFactors(A=self.A.reconstruct(task).T.contiguous().float(),
                           B=self.B.reconstruct(task).float(), kind=self.kind)


@dataclass(frozen=True)
class BasisArtifact:
    """A basis directory opened for reading; module tensors are read on demand."""

    path: Path
    manifest: dict

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def module_names(self) -> list[str]:
        return list(self.manifest["modules"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def granularity(self) -> Granularity:
        return self.manifest["granularity"]

    def task_index(self, task: str) -> int:
        names = self.task_names
        if task not in names:
            raise RecipeError(f"unknown task '{task}' in basis", path=str(self.path),
                              fix=f"use one of: {', '.join(names)}")
        return names.index(task)

    def module(self, name: str) -> BasisModule:
        from safetensors import safe_open

        record = self.manifest["modules"][name]
        parts: dict[str, FactorPCA] = {}
        with safe_open(str(self.path / WEIGHTS_NAME), framework="pt") as fh:
            keys = set(fh.keys())
            for factor in ("B", "A"):
                prefix = f"{name}::{factor}"
                mean_key = f"{prefix}.mean"
                parts[factor] = FactorPCA(
                    granularity=self.granularity, basis=fh.get_tensor(f"{prefix}.basis"),
                    coef=fh.get_tensor(f"{prefix}.coef"),
                    mean=fh.get_tensor(mean_key) if mean_key in keys else None,
                )
        return BasisModule(name=name, kind=record["kind"], B=parts["B"], A=parts["A"])

    def task_factors(self, task: str, module: str) -> LoraFactors:
        """Task ``task``'s reconstructed factors for ``module`` (scale folded, delta = B @ A)."""
        return self.module(module).task_factors(self.task_index(task))

    def task_modules(self, task: str) -> list[OutputModule]:
        """Every module the task's original adapter had, rebuilt from the basis."""
        index = self.task_index(task)
        out = []
        for name in self.manifest["tasks"][index]["modules"]:
            f = self.module(name).task_factors(index)
            out.append(OutputModule(name=name, kind=f.kind, A=f.A, B=f.B))
        return out


def load_basis(path: str | Path) -> BasisArtifact:
    """Open a basis directory written by ``build_basis``."""
    path = Path(path).expanduser()
    manifest = read_manifest(path, MANIFEST_NAME, BASIS_FORMAT, BASIS_FORMAT_VERSION, what="basis directory",
                             verb="basis build")
    fix = "point at a directory written by `loramerge basis build`, or rebuild it"
    if not (path / WEIGHTS_NAME).is_file():
        raise AdapterLoadError(f"{WEIGHTS_NAME} is missing", path=str(path), fix=fix)
    return BasisArtifact(path=path.resolve(), manifest=manifest)


# ---------------------------------------------------------------------------------------------------------------------
# Build and extract
# ---------------------------------------------------------------------------------------------------------------------

def _check_k(k: int, n_tasks: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecipeError(f"the basis size k must be a positive integer, got {k!r}", fix="use 1 <= k <= number of tasks")
    if k > n_tasks:
        raise RecipeError(f"the basis size k={k} exceeds the number of tasks ({n_tasks})",
                          fix=f"use k <= {n_tasks}; k = {n_tasks} already reconstructs every task exactly")


def _task_record(adapter: LoraAdapter, modules: list[str]) -> dict:
    dtype = dtype_name(adapter.dtype)
    return {
        "name": adapter.name, "source": adapter.source.reference, "revision": adapter.source.revision,
        "sha256": adapter.sha256, "base_model": adapter.base_model, "task_type": adapter.config.get("task_type"),
        "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out")),
        "target_modules": target_modules_for([adapter], modules), "dtype": dtype, "modules": modules,
    }


def build_basis(
    adapters: Sequence[AdapterLike] | AdapterSet,
    k: int,
    out_dir: str | Path,
    *,
    granularity: Granularity = "module",
    center: bool = False,
    force: bool = False,
    names: Sequence[str] | None = None,
    show_progress: bool = False,
) -> BasisArtifact:
    """Build an RMM basis of size ``k`` over the task adapters and write it to ``out_dir`` (atomically).

    The manifest records the storage ratio (stored parameters / the tasks' factor parameters)
    and each task's relative reconstruction error of delta_W (over its modules, and the worst module).
    """
    if granularity not in ("module", "row"):
        raise RecipeError(f"granularity must be 'module' or 'row', got {granularity!r}",
                          fix="use granularity='module' (one basis per factor) or 'row' (one per row)")
    tasks = adapters if isinstance(adapters, AdapterSet) and names is None else AdapterSet.open(list(adapters), names=names)
    _check_k(k, len(tasks))
    base_model = tasks.base_model
    out = check_output_path(Path(out_dir), force=force, inputs=[a.source.local_path for a in tasks])
    module_names = tasks.module_names
    tensors: dict[str, torch.Tensor] = {}
    module_records: dict[str, dict] = {}
    err_sq = [0.0] * len(tasks)
    norm_sq = [0.0] * len(tasks)
    worst = [0.0] * len(tasks)
    original = stored = 0
    for name in progress_bar(module_names, description="building basis", enabled=show_progress):
        present = [t for t, a in enumerate(tasks) if name in a.modules]
        info = tasks[present[0]].modules[name]
        rank = max(tasks[t].modules[name].rank for t in present)
        X_B = torch.zeros(len(tasks), info.d_out, rank, dtype=_WORK)
        X_A = torch.zeros(len(tasks), info.d_in, rank, dtype=_WORK)
        originals: dict[int, LoraFactors] = {}
        for t in present:
            f = tasks[t].factors(name)
            originals[t] = f
            X_B[t], A = canonical_factors(f, rank)
            X_A[t] = A.T
            original += f.A.numel() + f.B.numel()
        # stored in float32: the errors below are those of what is written
        pca = BasisModule(name=name, kind=info.kind,
                          B=fit_factor_pca(X_B, k, granularity, center).to(torch.float32),
                          A=fit_factor_pca(X_A, k, granularity, center).to(torch.float32))
        for t, f in originals.items():
            rebuilt = pca.task_factors(t)
            err = product_error(rebuilt.B, rebuilt.A, f.B, f.A)
            norm = _delta_norm(f.B, f.A)
            err_sq[t] += err * err
            norm_sq[t] += norm * norm
            worst[t] = max(worst[t], err / norm if norm > 0 else 0.0)
        for factor, part in (("B", pca.B), ("A", pca.A)):
            tensors.update({key: value.contiguous() for key, value in part.tensors(f"{name}::{factor}").items()})
            stored += part.num_parameters
        module_records[name] = {"kind": info.kind, "d_in": info.d_in, "d_out": info.d_out, "rank": rank,
                                "k_B": pca.B.k, "k_A": pca.A.k}
    task_records = []
    for t, adapter in enumerate(tasks):
        record = _task_record(adapter, sorted(adapter.modules))
        record["rel_error"] = math.sqrt(err_sq[t] / norm_sq[t]) if norm_sq[t] > 0 else 0.0
        record["max_module_rel_error"] = worst[t]
        task_records.append(record)
    manifest = {
        "format": BASIS_FORMAT, "format_version": BASIS_FORMAT_VERSION, "loramerge_version": __version__,
        "method": "rmm", "paper": "Towards Reversible Model Merging For Low-rank Weights (Alipour & Amiri, 2025)",
        "url": "https://arxiv.org/abs/2510.14163",
        "k": k, "granularity": granularity, "center": center, "base_model": base_model,
        "canonical_form": "B = U S^1/2, A = S^1/2 V^T (factored SVD); each U column's largest |entry| positive",
        "storage": {"stored_parameters": stored, "original_parameters": original,
                    "storage_ratio": stored / original if original else 0.0},
        "tasks": task_records, "modules": module_records,
    }
    _write_basis(out, tensors, manifest, force)
    return load_basis(out)


def _write_basis(out: Path, tensors: dict[str, torch.Tensor], manifest: dict, force: bool) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_directory(out, force=force) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "loramerge_artifact": BASIS_FORMAT})
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"could not write the basis: {exc}", path=str(out),
                          fix="check free disk space and permissions; nothing was changed at the output path") from exc


def _card(title: str, base_model: str | None, lines: Iterable[str]) -> str:
    front = ["---", "library_name: peft", "tags: [loramerge, lora]"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    return "\n".join([*front, "---", "", f"# {title}", "", *lines, ""])


def extract_task(basis_dir: str | Path, task: str, out_dir: str | Path, *, force: bool = False,
                 dtype: str | None = None) -> Path:
    """Rebuild task ``task`` from the basis and write it as a PEFT adapter (``PeftModel.from_pretrained``)."""
    artifact = load_basis(basis_dir)
    index = artifact.task_index(task)
    record = artifact.manifest["tasks"][index]
    out_dtype = to_torch(dtype or record.get("dtype", "float32"))
    out = check_output_path(Path(out_dir), force=force, inputs=[artifact.path])
    modules = artifact.task_modules(task)
    config = build_lora_config(modules, base_model=record["base_model"], target_modules=record["target_modules"],
                               task_type=record["task_type"], fan_in_fan_out=record.get("fan_in_fan_out", False))
    provenance = {"loramerge_version": __version__, "extracted_from": str(artifact.path), "task": record,
                  "k": artifact.k, "granularity": artifact.granularity}
    card = _card(f"Task '{task}' rebuilt from an RMM basis", record["base_model"], [
        f"Rebuilt by loramerge {__version__} from a reversible basis of size k={artifact.k} "
        f"({artifact.granularity} granularity) over {len(artifact.task_names)} tasks.",
        f"Relative reconstruction error of delta_W: {record['rel_error']:.3g} "
        f"(worst module {record['max_module_rel_error']:.3g}).",
        f"Original adapter: `{record['source']}` (sha256 `{record['sha256']}`).",
    ])
    write_adapter(out, modules, config, dtype=out_dtype, card=card,
                  extra_files={"loramerge.json": json.dumps(provenance, indent=2) + "\n"},
                  metadata={"loramerge_artifact": "basis-extract", "loramerge_version": __version__}, force=force)
    return out


__all__ = [
    "BasisArtifact", "BasisModule", "FactorPCA", "build_basis", "canonical_factors", "extract_task",
    "fit_factor_pca", "load_basis", "product_error",
]


def task_factors(basis_dir: str | Path, task: str) -> dict[str, LoraFactors]:
    """One task's adapter rebuilt from a basis directory, module -> factors (the serving seam).

    Raises KeyError for a task the basis does not hold.
    """
    artifact = load_basis(basis_dir)
    if task not in artifact.task_names:
        raise KeyError(task)
    return {m.name: LoraFactors(A=m.A, B=m.B, kind=m.kind) for m in artifact.task_modules(task)}
