"""OSRM: LoRA A matrices chosen before fine-tuning to be blind to the other tasks' features.

Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging" (ACL 2025,
arXiv 2505.22934). In a merged model adapter 2 adds ``B_2 A_2 h_1`` on task 1's features ``h_1``; OSRM picks
each module's ``A`` (r x d_in, orthonormal rows) so that ``A h`` is small for inputs ``h`` of the *other* tasks.

Two forms (the paper and its reference code differ; docs/ARCHITECTURE.md lists such choices):

- ``mode="covariance"`` (the paper, default): minimise ``||A H^T||_F^2`` subject to ``A A^T = I``, where H stacks
  the target module's input features over the other tasks' (non-padding) tokens. The rows of A are the
  eigenvectors of ``H^T H`` (``center=True``: of the centred covariance) with the r smallest eigenvalues.
- ``mode="mean_nullspace"`` (the authors' code): one mean input vector per other task (token mean per sample, then
  the mean over samples; padding masked, unlike the code), stacked into X ((T-1) x d_in); A is the last r right
  singular vectors of a full SVD of X. That basis of the null space is arbitrary (LAPACK-dependent); use it
  only to reproduce the code.

Typical use::

    init = compute_osrm_init(base, {"code": code_texts, "poems": poem_texts}, tokenizer=tok, r=8)
    init.save("osrm-math/")                      # small artifact: A per module + diagnostics
    model = prepare_osrm_model(base, init, lora_alpha=16, freeze_A=True)   # PEFT model, B = 0
    ...train...; model.save_pretrained(out); init.save(out)               # record the init beside the adapter
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from loramerge.core.adapter import PEFT_PREFIX
from loramerge.errors import (
    BaseModelError,
    LoramergeError,
    NumericalError,
    OutputError,
    RecipeError,
)
from loramerge.io.writer import atomic_directory
from loramerge.training.osrm_inputs import (
    Accumulator,
    collect_inputs,
    in_features,
    lora_config,
    read_texts,
    resolve_targets,
    task_texts,
)

OsrmMode = Literal["covariance", "mean_nullspace"]
MODES = ("covariance", "mean_nullspace")
INIT_FILE = "osrm_init.safetensors"
INFO_FILE = "osrm.json"
METADATA_KEY = "loramerge.training.osrm"
FORMAT_VERSION = 1
DEFAULT_TARGETS = ("q_proj", "v_proj")
DEFAULT_GRAM_BUDGET = 4 * 2**30


# --------------------------------------------------------------------------------------------------------------
# Directions


def canonical_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive (a deterministic sign for eigenvectors)."""
    pivots = rows.gather(1, rows.abs().argmax(1, keepdim=True))
    return rows * torch.where(pivots < 0, -1.0, 1.0).to(rows.dtype)


def smallest_eigen_directions(second_moment: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, eigenvalues): the r eigenvectors of a symmetric PSD matrix with the smallest eigenvalues, as rows,
    and the r + 1 smallest eigenvalues (the extra one shows the gap that makes the choice unique)."""
    sym = (second_moment + second_moment.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(sym.double())  # ascending
    return canonical_signs(eigenvectors[:, :r].T), eigenvalues[: r + 1]


def mean_nullspace_directions(means: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' code form: the last r right singular vectors of the stacked task means (full SVD)."""
    _, singular_values, vh = torch.linalg.svd(means.double(), full_matrices=True)
    return canonical_signs(vh[-r:]), singular_values


def energy_ratio(A: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr(A S A^T) over its expectation for a random r-dim subspace, r/d_in tr(S): 0 = blind, 1 = random."""
    r, d_in = A.shape
    A = A.to(second_moment.dtype)
    expected = r / d_in * float(torch.trace(second_moment))
    captured = max(float(torch.trace(A @ second_moment @ A.T)), 0.0)  # PSD: negatives are rounding noise
    return captured / expected if expected > 0 else 0.0


@dataclass
class OsrmInit:
    """What OSRM computed: per target module an A (r x d_in, orthonormal rows) and its diagnostics.

    ``energy_ratio[m]``: share of the other tasks' input energy that A captures, relative to a random subspace of
    the same rank (the smaller the better). ``eigenvalues[m]``: the r + 1 smallest eigenvalues of the second
    moment (covariance mode) or all singular values of the task-mean matrix (mean_nullspace mode).
    """

    directions: dict[str, torch.Tensor]
    r: int
    mode: str
    target_modules: list[str] | str
    center: bool = False
    tasks: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    base_model: str | None = None
    energy_ratio: dict[str, float] = field(default_factory=dict)
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)

    def info(self) -> dict:
        """The JSON record (everything but the tensors)."""
        return {
            "format": "loramerge.training.osrm", "version": FORMAT_VERSION, "method": "OSRM (Zhang & Zhou, ACL 2025)",
            "paper": "https://arxiv.org/abs/2505.22934", "mode": self.mode, "center": self.center, "r": self.r,
            "target_modules": self.target_modules, "base_model": self.base_model, "tasks": self.tasks,
            "tokens": self.tokens, "modules": sorted(self.directions),
            "energy_ratio": {k: round(v, 8) for k, v in sorted(self.energy_ratio.items())},
        }

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write ``osrm_init.safetensors`` and ``osrm.json`` into ``path`` (a new directory, written atomically,
        or an existing one such as the trained adapter's; existing OSRM files are replaced only with force)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{name}.A": A.float().contiguous() for name, A in self.directions.items()}
        tensors.update({f"{name}.eigenvalues": ev.float().contiguous() for name, ev in self.eigenvalues.items()})
        info = json.dumps(self.info(), indent=2, sort_keys=True) + "\n"

        def write(directory: Path) -> None:
            _atomic_file(directory / INIT_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: info}))
            _atomic_file(directory / INFO_FILE, lambda tmp: tmp.write_text(info))

        if not path.exists():
            with atomic_directory(path, force=force) as tmp:
                write(tmp)
            return path
        if not path.is_dir():
            raise OutputError("the OSRM init goes into a directory, and this path is a file", path=str(path),
                              fix="pass a directory (new, or the adapter directory)")
        if not force and ((path / INIT_FILE).exists() or (path / INFO_FILE).exists()):
            raise OutputError("the directory already holds an OSRM init", path=str(path),
                              fix="choose another directory, or pass force=True")
        write(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OsrmInit:
        """Read an init written by :meth:`save` (a directory or the .safetensors file itself)."""
        from safetensors import safe_open

        path = Path(path)
        file = path / INIT_FILE if path.is_dir() else path
        if not file.exists():
            raise LoramergeError("no OSRM init found", path=str(file),
                                 fix="pass the directory written by OsrmInit.save (it holds osrm_init.safetensors)")
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise LoramergeError("the file has no OSRM record in its metadata", path=str(file),
                                     fix="re-create it with compute_osrm_init(...).save(dir)")
            info = json.loads(metadata[METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if info.get("version", 0) > FORMAT_VERSION:
            raise LoramergeError(f"OSRM init format {info['version']} is newer than this loramerge understands",
                                 path=str(file), fix="upgrade loramerge")
        return cls(
            directions={m: tensors[f"{m}.A"] for m in info["modules"]},
            eigenvalues={m: tensors[f"{m}.eigenvalues"] for m in info["modules"] if f"{m}.eigenvalues" in tensors},
            r=info["r"], mode=info["mode"], center=info["center"], target_modules=info["target_modules"],
            tasks=info["tasks"], tokens=info["tokens"], base_model=info["base_model"],
            energy_ratio=dict(info["energy_ratio"]),
        )

    def apply(self, peft_model: torch.nn.Module, *, adapter_name: str = "default", freeze_A: bool = False) -> None:
        """Set every LoRA layer's A to these directions and B to zero (A frozen when asked)."""
        layers = lora_layers(peft_model, adapter_name)
        if set(layers) != set(self.directions):
            missing, extra = sorted(set(self.directions) - set(layers)), sorted(set(layers) - set(self.directions))
            raise RecipeError(f"the model's LoRA layers do not match the OSRM init (missing {missing[:3]}, "
                              f"extra {extra[:3]})", fix="use the same target_modules for the init and the model")
        with torch.no_grad():
            for name, layer in layers.items():
                weight_A, weight_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                A = self.directions[name]
                if weight_A.shape != A.shape:
                    raise RecipeError(f"LoRA A has shape {tuple(weight_A.shape)}, the init {tuple(A.shape)}",
                                      module=name, fix="use the same r for the model and the init")
                weight_A.copy_(A.to(weight_A.device, weight_A.dtype))
                weight_B.zero_()
                weight_A.requires_grad_(not freeze_A)


def _atomic_file(target: Path, write) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lora_layers(peft_model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """The model's LoRA layers holding ``adapter_name``, keyed by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = module
    if not layers:
        raise RecipeError(f"the model has no LoRA layers for adapter '{adapter_name}'",
                          fix="pass a PEFT model (get_peft_model) and the adapter's name")
    return layers


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def _load_model(base: Any) -> tuple[torch.nn.Module, str | None]:
    """A transformers model object as is, or a causal LM loaded from a local path; plus its name."""
    if isinstance(base, (str, Path)):
        from transformers import AutoModelForCausalLM

        if not (Path(base) / "config.json").is_file():
            raise BaseModelError("the base model is not a local model directory (no config.json)", path=str(base),
                                 fix="pass the directory written by save_pretrained (model and tokenizer)")
        try:
            return AutoModelForCausalLM.from_pretrained(str(base)), str(base)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"could not load the base model: {exc}", path=str(base),
                                 fix="pass a causal LM directory written by save_pretrained") from exc
    return base, getattr(getattr(base, "config", None), "name_or_path", None) or None


def _resolve_tokenizer(base: Any, tokenizer: Any):
    if tokenizer is not None:
        return tokenizer
    if isinstance(base, (str, Path)):
        from transformers import AutoTokenizer

        if not (Path(base) / "config.json").is_file():
            raise BaseModelError("the base model is not a local model directory (no config.json)", path=str(base),
                                 fix="pass the directory written by save_pretrained (model and tokenizer)")

        return AutoTokenizer.from_pretrained(str(base))
    raise RecipeError("a tokenizer is needed to run the other tasks' texts through the model",
                      fix="pass tokenizer=AutoTokenizer.from_pretrained(...), or pass the base model as a path")


def compute_osrm_init(
    base: Any,
    other_inputs: Any,
    *,
    tokenizer: Any = None,
    r: int = 8,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    mode: OsrmMode = "covariance",
    center: bool = False,
    text_field: str = "text",
    max_samples: int | None = 512,
    batch_size: int = 8,
    max_length: int = 128,
    gram_budget_bytes: int = DEFAULT_GRAM_BUDGET,
) -> OsrmInit:
    """OSRM's A for every target module, from the base model and unlabeled inputs of the *other* tasks.

    ``base``: a transformers model (not modified) or a local path. ``other_inputs``: ``{task: source}`` or one
    source (see :func:`read_texts`); ``max_samples`` caps each task. Features are the target modules' inputs
    in the pre-trained model over non-padding tokens. Gram matrices (d_in x d_in, float64) are built for as
    many modules per pass as fit in ``gram_budget_bytes``; bigger models take several passes over the texts.
    """
    if mode not in MODES:
        raise RecipeError(f"unknown OSRM mode '{mode}'", fix=f"use one of {', '.join(MODES)}")
    if r < 1:
        raise RecipeError(f"rank must be positive, got {r}", fix="pass r >= 1")
    tasks = task_texts(other_inputs, text_field=text_field, max_samples=max_samples)
    tokenizer = _resolve_tokenizer(base, tokenizer)
    model, base_name = _load_model(base)
    modules = resolve_targets(model, target_modules, r)
    for name, module in modules.items():
        if r > in_features(module):
            raise RecipeError(f"rank {r} exceeds the module's input width {in_features(module)}", module=name,
                              fix="pick a smaller r")
    init = OsrmInit(directions={}, r=r, mode=mode, center=center,
                    target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                    tasks={t: len(texts) for t, texts in tasks.items()}, base_model=base_name)
    for group in _module_groups(modules, mode, gram_budget_bytes):
        stats = collect_inputs(model, group, tasks, tokenizer, want_gram=mode == "covariance", batch_size=batch_size,
                         max_length=max_length, dtype=torch.float64)
        for name, acc in stats.items():
            _fill_module(init, name, acc, r, mode, center)
            init.tokens = acc.tokens
        del stats
    return init


def _module_groups(modules: dict[str, torch.nn.Module], mode: str, budget: int) -> list[dict[str, torch.nn.Module]]:
    """Split the targets so that one pass's Gram matrices fit the memory budget (one pass in mean mode)."""
    if mode != "covariance":
        return [modules]
    groups: list[dict[str, torch.nn.Module]] = [{}]
    used = 0
    for name, module in modules.items():
        size = in_features(module) ** 2 * 8
        if groups[-1] and used + size > budget:
            groups.append({})
            used = 0
        groups[-1][name] = module
        used += size
    return groups


def _fill_module(init: OsrmInit, name: str, acc: Accumulator, r: int, mode: str, center: bool) -> None:
    if mode == "covariance":
        second = acc.gram / acc.tokens
        if center:
            mean = acc.token_sum / acc.tokens
            second = (acc.gram - acc.tokens * torch.outer(mean, mean)) / max(acc.tokens - 1, 1)
        if not torch.isfinite(second).all():
            raise NumericalError("the input covariance has NaN or Inf entries", module=name,
                                 fix="check the base model's weights and dtype (run in float32)")
        A, values = smallest_eigen_directions(second.cpu(), r)
        ratio = energy_ratio(A, second.cpu())
    else:
        means = torch.stack([acc.sample_mean_sums[t] / acc.samples[t] for t in acc.sample_mean_sums]).cpu()
        A, values = mean_nullspace_directions(means, r)
        expected = r / means.shape[1] * float(means.pow(2).sum())  # tr(A M^T M A^T) vs a random subspace
        ratio = float((means @ A.T).pow(2).sum()) / expected if expected > 0 else 0.0
    init.directions[name] = A.float()
    init.eigenvalues[name] = values.float()
    init.energy_ratio[name] = ratio


def prepare_osrm_model(
    base: Any,
    init: OsrmInit | str | Path,
    *,
    lora_alpha: float | None = None,
    freeze_A: bool = False,
    lora_dropout: float = 0.0,
    adapter_name: str = "default",
    **lora_kwargs: Any,
):
    """A PEFT model ready to train: LoraConfig with the init's r and targets, A = OSRM directions, B = 0.

    ``base`` (a model object, wrapped in place as ``get_peft_model`` does, or a local path). ``lora_alpha``
    defaults to 2r (the paper's code: r 8, alpha 16). ``freeze_A=True`` keeps A in the orthogonal subspace
    during training (the code trains it; its orthogonality then only holds at the start).
    """
    from peft import get_peft_model

    if not isinstance(init, OsrmInit):
        init = OsrmInit.load(init)
    model, base_name = _load_model(base)
    config = lora_config(init.r, init.target_modules, lora_alpha=lora_alpha if lora_alpha is not None else 2 * init.r,
                          lora_dropout=lora_dropout, **lora_kwargs)
    if base_name and not config.base_model_name_or_path:
        config.base_model_name_or_path = base_name
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    init.apply(peft_model, adapter_name=adapter_name, freeze_A=freeze_A)
    return peft_model


def osrm_model(
    base: Any,
    other_inputs: Any,
    *,
    tokenizer: Any = None,
    r: int = 8,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    mode: OsrmMode = "covariance",
    freeze_A: bool = False,
    save_init: str | Path | None = None,
    **kwargs: Any,
):
    """compute_osrm_init + prepare_osrm_model in one call; ``save_init`` writes the init artifact too."""
    collect_keys = {"center", "text_field", "max_samples", "batch_size", "max_length", "gram_budget_bytes"}
    collect_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in collect_keys}
    tokenizer = _resolve_tokenizer(base, tokenizer)
    model, _ = _load_model(base)
    init = compute_osrm_init(model, other_inputs, tokenizer=tokenizer, r=r, target_modules=target_modules, mode=mode,
                             **collect_kwargs)
    if save_init is not None:
        init.save(save_init)
    return prepare_osrm_model(model, init, lora_alpha=lora_alpha, freeze_A=freeze_A, **kwargs)


def orthonormality_error(A: torch.Tensor) -> float:
    """max |A A^T - I|: 0 for orthonormal rows."""
    A = A.double()
    return float((A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)).abs().max())


__all__ = [
    "OsrmInit", "compute_osrm_init", "energy_ratio", "lora_layers", "mean_nullspace_directions",
    "orthonormality_error", "osrm_model", "prepare_osrm_model", "read_texts",
    "resolve_targets", "smallest_eigen_directions", "task_texts",
]
