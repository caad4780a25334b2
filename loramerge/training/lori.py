"""LoRI: LoRA with a frozen random A and a sparse, task-specific B.

Zhang, You, Panda, Goldstein, "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation"
(arXiv 2504.07448). Recipe (docs/ARCHITECTURE.md, "Conventions", for how it meets the merges):

1. LoRI-D: A frozen at a random init, B = 0 trained densely.   ``model = lori_model(base, LoriSpec(seed=1))``
2. Masks: keep the top (1 - sparsity) of |B| (default sparsity 0.9), pooled over all modules (``scope="global"``,
   the paper's) or per module (``scope="module"``).             ``masks = extract_masks(model)``
3. LoRI-S: a fresh model with the *same* A (regenerated from the seed), B = 0, trained with B kept exactly
   sparse: gradients outside the mask are zeroed and the mask is re-applied after every optimizer step.
   ``masker = SparseBMasker(model_s, masks).attach(optimizer)`` or ``Trainer(callbacks=[LoriMaskCallback(masker)])``
4. ``save_lori_adapter(model_s, out, spec, masks)``: a PEFT adapter plus ``lori.json`` (seed and A recipe, so A can
   be regenerated and checked with :func:`verify_lori_adapter`) and the masks.

A is drawn per module from a generator seeded by sha256(seed, module name), on the CPU in float32, so it does not
depend on the global RNG, the device or the order in which modules are created. Two adapters with the same seed
and recipe share A (a linear merge of the factors is then exact, but the near-orthogonality of independent random
A's is lost); different seeds give independent A's (merge them in product space: task_arithmetic / cat).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from loramerge.core.adapter import load_adapter
from loramerge.errors import LoramergeError, RecipeError
from loramerge.io.writer import atomic_directory, check_output_path
from loramerge.training.osrm import lora_layers

LORI_FILE = "lori.json"
MASK_FILE = "lori_masks.safetensors"
A_RECIPE = "loramerge.training.lori.a.v1"  # sha256(f"{seed}:{module}") -> torch.Generator (CPU) -> A in float32
A_INITS = ("kaiming_uniform", "gaussian")
SCOPES = ("global", "module")
FORMAT_VERSION = 1
ALL_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

AInit = Literal["kaiming_uniform", "gaussian"]
Scope = Literal["global", "module"]


# --------------------------------------------------------------------------------------------------------------
# The frozen random A


@dataclass(frozen=True)
class LoriSpec:
    """Everything needed to rebuild a LoRI adapter's LoRA config and regenerate its A.

    ``a_init``: "kaiming_uniform" (U(-1/sqrt(d_in), 1/sqrt(d_in)): PEFT's default LoRA-A distribution, used by
    the paper's code) or "gaussian" (N(0, 1/d_in), a Johnson-Lindenstrauss projection). ``a_sharing`` declares
    whether other tasks' adapters use the same seed ("shared": linear factor merges are exact) or their own
    ("independent": near-orthogonal A's; merge in product space). Defaults follow the paper's code: r 32,
    alpha 64, dropout 0.05, all seven Llama projections.
    """

    seed: int = 0
    r: int = 32
    lora_alpha: float = 64
    target_modules: tuple[str, ...] | str = ALL_LLAMA_PROJECTIONS
    lora_dropout: float = 0.05
    a_init: AInit = "kaiming_uniform"
    a_sharing: Literal["independent", "shared"] = "independent"

    def __post_init__(self) -> None:
        if self.a_init not in A_INITS:
            raise RecipeError(f"unknown LoRI A init '{self.a_init}'", fix=f"use one of {', '.join(A_INITS)}")
        if self.a_sharing not in ("independent", "shared"):
            raise RecipeError(f"a_sharing must be 'independent' or 'shared', got '{self.a_sharing}'",
                              fix="use a_sharing='independent' (default) or 'shared'")
        if self.r < 1:
            raise RecipeError(f"rank must be positive, got {self.r}", fix="pass r >= 1")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {**data, "a_recipe": A_RECIPE}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoriSpec:
        if data.get("a_recipe", A_RECIPE) != A_RECIPE:
            raise LoramergeError(f"unknown A recipe '{data['a_recipe']}'", fix="upgrade loramerge to regenerate this A")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def lora_config(self, **kwargs: Any):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=targets,
                          lora_dropout=self.lora_dropout, **kwargs)


def module_seed(seed: int, module: str) -> int:
    """A stable 63-bit seed for one module (sha256, so no Python hash randomisation)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_a(spec: LoriSpec, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """Regenerate one module's frozen A (r x d_in, float32, CPU) from the spec's seed and recipe."""
    r, d_in = shape
    gen = torch.Generator(device="cpu").manual_seed(module_seed(spec.seed, module))
    if spec.a_init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (r x d_in) weight
        return (torch.rand(r, d_in, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return torch.randn(r, d_in, generator=gen, dtype=torch.float32) / math.sqrt(d_in)


def lori_model(base: Any, spec: LoriSpec = LoriSpec(), *, adapter_name: str = "default", **lora_kwargs: Any):
    """A PEFT LoRA model for LoRI: A regenerated from ``spec`` and frozen, B = 0 (trainable).

    ``base``: a transformers model (wrapped in place, as ``get_peft_model`` does) or a local path. The same spec on
    the same base always gives the same A, so LoRI-S can restart from LoRI-D's A.
    """
    from peft import get_peft_model

    if isinstance(base, (str, Path)):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base))
    config = spec.lora_config(**lora_kwargs)
    name_or_path = getattr(getattr(base, "config", None), "name_or_path", None)
    if name_or_path and not config.base_model_name_or_path:
        config.base_model_name_or_path = name_or_path
    model = get_peft_model(base, config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, layer in lora_layers(model, adapter_name).items():
            weight_A = layer.lora_A[adapter_name].weight
            weight_A.copy_(random_a(spec, name, tuple(weight_A.shape)).to(weight_A.device, weight_A.dtype))
            weight_A.requires_grad_(False)
            layer.lora_B[adapter_name].weight.zero_()
    return model


# --------------------------------------------------------------------------------------------------------------
# Masks


@dataclass
class LoriMasks:
    """Boolean keep-masks over each module's B (d_out x r): True = trainable / kept."""

    masks: dict[str, torch.Tensor]
    sparsity: float
    scope: str
    source: str | None = None
    info: dict = field(default_factory=dict)

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def save(self, path: str | Path) -> Path:
        """Write the masks as uint8 safetensors with the sparsity and scope in the metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: mask.to(torch.uint8).contiguous() for name, mask in self.masks.items()}
        meta = {"loramerge.training.lori.masks": json.dumps({"sparsity": self.sparsity, "scope": self.scope,
                                                    "source": self.source, "version": FORMAT_VERSION})}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LoriMasks:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / MASK_FILE
        if not path.exists():
            raise LoramergeError("no LoRI mask file found", path=str(path),
                                 fix="pass the file written by LoriMasks.save or a LoRI adapter directory with masks")
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("loramerge.training.lori.masks", "{}"))
            masks = {key: handle.get_tensor(key).bool() for key in handle.keys()}
        if "sparsity" not in meta:
            raise LoramergeError("the file is not a LoRI mask file (no metadata)", path=str(path),
                                 fix="re-create the masks with extract_masks(...).save(path)")
        return cls(masks=masks, sparsity=meta["sparsity"], scope=meta["scope"], source=meta.get("source"))


def _b_magnitudes(source: Any, adapter_name: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """|B| per module with the adapter's scale folded in (alpha/r; uniform in LoRI, so the ranking is |B|'s)."""
    if isinstance(source, torch.nn.Module):
        out = {}
        for name, layer in lora_layers(source, adapter_name).items():
            weight = layer.lora_B[adapter_name].weight.detach()
            out[name] = (weight.float().cpu() * float(layer.scaling[adapter_name])).abs()
        return out, None
    adapter = load_adapter(source)
    return {name: adapter.factors(name).B.abs() for name in adapter.modules}, str(source)


def keep_count(total: int, sparsity: float) -> int:
    """How many entries a sparsity keeps: round((1 - sparsity) * total)."""
    return int(round((1.0 - sparsity) * total))


def _top_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Exactly ``keep`` True entries at the largest values (ties broken by torch.topk)."""
    flat = values.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view(values.shape)


def extract_masks(source: Any, *, sparsity: float = 0.9, scope: Scope = "global",
                  adapter_name: str = "default") -> LoriMasks:
    """Masks from a trained dense (LoRI-D) run: a PEFT model or a saved adapter directory.

    ``scope="global"`` (the paper's): one threshold over the |B| entries of all modules, so per-module sparsity
    varies; ``scope="module"``: each module keeps its own top (1 - sparsity). Exactly round((1 - sparsity) * n)
    entries are kept (n over all modules, or per module).
    """
    if not 0.0 <= sparsity < 1.0:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity}", fix="e.g. sparsity=0.9 keeps 10% of B")
    if scope not in SCOPES:
        raise RecipeError(f"unknown mask scope '{scope}'", fix="use 'global' or 'module'")
    magnitudes, source_name = _b_magnitudes(source, adapter_name)
    if scope == "module":
        masks = {name: _top_mask(mag, keep_count(mag.numel(), sparsity)) for name, mag in magnitudes.items()}
    else:
        names = sorted(magnitudes)
        pooled = torch.cat([magnitudes[n].reshape(-1) for n in names])
        flat = _top_mask(pooled, keep_count(pooled.numel(), sparsity))
        masks, offset = {}, 0
        for name in names:
            size = magnitudes[name].numel()
            masks[name] = flat[offset:offset + size].view(magnitudes[name].shape)
            offset += size
    return LoriMasks(masks=masks, sparsity=sparsity, scope=scope, source=source_name)


# --------------------------------------------------------------------------------------------------------------
# Keeping B sparse while training


class SparseBMasker:
    """Keeps every LoRA B exactly zero outside its mask during training.

    ``attach(optimizer)`` zeroes B outside the mask, registers a gradient hook on each B that zeroes the masked
    gradient entries, and (with an optimizer) a step post-hook that re-applies the mask after every step, so
    weight decay, momentum or numerical noise can never revive a masked entry. With a Trainer use
    :class:`LoriMaskCallback`. ``apply()`` can also be called by hand after ``optimizer.step()``.
    """

    def __init__(self, model: torch.nn.Module, masks: LoriMasks | Mapping[str, torch.Tensor], *,
                 adapter_name: str = "default"):
        mask_dict = masks.masks if isinstance(masks, LoriMasks) else dict(masks)
        layers = lora_layers(model, adapter_name)
        missing = sorted(set(layers) - set(mask_dict))
        if missing:
            raise RecipeError(f"no mask for {len(missing)} LoRA module(s), e.g. {missing[0]}", module=missing[0],
                              fix="extract the masks from a run with the same target modules")
        self.params: dict[str, torch.nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            weight = layer.lora_B[adapter_name].weight
            mask = mask_dict[name].bool()
            if tuple(mask.shape) != tuple(weight.shape):
                raise RecipeError(f"mask shape {tuple(mask.shape)} does not match B {tuple(weight.shape)}",
                                  module=name, fix="use masks extracted with the same rank and targets")
            self.params[name] = weight
            self.masks[name] = mask
        self._grad_handles: list[Any] = []
        self._step_handles: list[Any] = []

    def _mask_on(self, name: str, like: torch.Tensor) -> torch.Tensor:
        mask = self.masks[name]
        if mask.device != like.device:
            mask = self.masks[name] = mask.to(like.device)
        return mask

    def apply(self) -> None:
        """Zero every B outside its mask (in place)."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.masked_fill_(~self._mask_on(name, param), 0)

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> SparseBMasker:
        """Apply the masks now and install the gradient hooks (and the optimizer post-step hook if given)."""
        self.apply()
        if not self._grad_handles:
            self._grad_handles = [param.register_hook(self._grad_hook(name)) for name, param in self.params.items()]
        if optimizer is not None:
            self._step_handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        return self

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~self._mask_on(name, grad), 0)
        return hook

    def detach(self) -> None:
        for handle in self._grad_handles + self._step_handles:
            handle.remove()
        self._grad_handles, self._step_handles = [], []

    def nonzero_outside_mask(self) -> int:
        """Entries of B that are non-zero where the mask says zero (0 when the invariant holds)."""
        return sum(int((param.detach() != 0)[~self._mask_on(name, param)].sum()) for name, param in self.params.items())

    def sparsity(self) -> float:
        """Fraction of B entries (all modules) that are exactly zero."""
        zeros = sum(int((p.detach() == 0).sum()) for p in self.params.values())
        return zeros / sum(p.numel() for p in self.params.values())


class LoriMaskCallback(TrainerCallback):
    """transformers Trainer callback: gradient masking from the start, mask re-applied after every step."""

    def __init__(self, masker: SparseBMasker):
        self.masker = masker

    def on_train_begin(self, args, state, control, **kwargs):
        self.masker.attach()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masker.apply()

    def on_step_end(self, args, state, control, **kwargs):
        self.masker.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.masker.apply()
        self.masker.detach()


# --------------------------------------------------------------------------------------------------------------
# Saving, loading, verifying


def lori_record(spec: LoriSpec, masks: LoriMasks | None = None, *, b_sparsity: float | None = None) -> dict:
    """The ``lori.json`` content: spec, A recipe, and the mask settings when B is sparse."""
    return {
        "format": "loramerge.training.lori", "version": FORMAT_VERSION, "method": "LoRI (Zhang et al., 2025)",
        "paper": "https://arxiv.org/abs/2504.07448", "spec": spec.to_dict(),
        "a_frozen": True,
        "masks": None if masks is None else {"sparsity": masks.sparsity, "scope": masks.scope,
                                              "kept": masks.kept(), "total": masks.total(), "file": MASK_FILE},
        "b_sparsity": b_sparsity,
    }


def save_lori_adapter(model: Any, output: str | Path, spec: LoriSpec, masks: LoriMasks | None = None, *,
                      adapter_name: str = "default", force: bool = False) -> Path:
    """Save the PEFT adapter plus ``lori.json`` (and ``lori_masks.safetensors``) atomically into ``output``."""
    output = check_output_path(Path(output), force=force)
    sparsity = None
    if masks is not None:
        sparsity = SparseBMasker(model, masks, adapter_name=adapter_name).sparsity()
    with atomic_directory(output, force=force) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        nested = tmp / adapter_name
        if adapter_name != "default" and nested.is_dir():
            for item in nested.iterdir():
                shutil.move(str(item), str(tmp / item.name))
            nested.rmdir()
        (tmp / LORI_FILE).write_text(json.dumps(lori_record(spec, masks, b_sparsity=sparsity), indent=2) + "\n")
        if masks is not None:
            masks.save(tmp / MASK_FILE)
    return output


def load_lori_spec(path: str | Path) -> LoriSpec:
    """The spec recorded in an adapter directory's ``lori.json`` (or the JSON file itself)."""
    path = Path(path)
    file = path / LORI_FILE if path.is_dir() else path
    if not file.exists():
        raise LoramergeError("no lori.json found", path=str(file),
                             fix="this is not a LoRI adapter saved by save_lori_adapter")
    try:
        record = json.loads(file.read_text())
        return LoriSpec.from_dict(record["spec"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LoramergeError(f"lori.json is malformed: {exc}", path=str(file),
                             fix="re-save the adapter with save_lori_adapter") from exc


def verify_lori_adapter(path: str | Path, *, atol: float = 0.0) -> dict[str, float]:
    """Regenerate every module's A from ``lori.json`` and compare with the saved A (in the saved dtype).

    Returns the max abs difference per module; raises if any exceeds ``atol`` (0: bit-exact).
    """
    spec = load_lori_spec(path)
    adapter = load_adapter(path)
    diffs = {}
    for name in adapter.modules:
        saved = adapter.factors(name).A  # float32 view of the stored A (A carries no scale)
        expected = random_a(spec, name, tuple(saved.shape)).to(adapter.dtype).float()
        diffs[name] = float((saved - expected).abs().max())
        if diffs[name] > atol:
            raise LoramergeError(f"saved A differs from the A regenerated from lori.json by {diffs[name]:.3g}",
                                 path=str(path), module=name,
                                 fix="the adapter was trained with another seed or A was not frozen")
    return diffs


def b_sparsity_of(path: str | Path) -> dict[str, float]:
    """Per-module fraction of exactly-zero B entries in a saved adapter."""
    adapter = load_adapter(path)
    return {name: float((adapter.factors(name).B == 0).float().mean()) for name in adapter.modules}


__all__ = [
    "LoriMaskCallback", "LoriMasks", "LoriSpec", "SparseBMasker", "b_sparsity_of", "extract_masks", "keep_count",
    "load_lori_spec", "lori_model", "lori_record", "module_seed", "random_a", "save_lori_adapter",
    "verify_lori_adapter",
]

