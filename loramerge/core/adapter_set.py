"""The one way to open a set of adapters: unique names, one compatibility check, and what they share.

Every consumer (the merge engine, compare, basis, twin, the routers and the server) opens its inputs
with :meth:`AdapterSet.open` (or wraps already-open adapters with :meth:`AdapterSet.of`). The set is
immutable: a renamed adapter is a copy, the caller's objects are never changed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

from loramerge.core.adapter import LoraAdapter, LoraFactors, ModuleInfo, load_adapter
from loramerge.core.dtypes import common_dtype
from loramerge.core.names import natural_sorted
from loramerge.errors import IncompatibleAdaptersError, RecipeError

if TYPE_CHECKING:
    import torch

AdapterLike = Union[str, Path, LoraAdapter]
log = logging.getLogger("loramerge.core.adapter_set")


@dataclass(frozen=True)
class AdapterSet:
    """Adapters opened together: distinct names, one base model, agreeing module shapes.

    ``module_names`` is the union of the adapters' modules in natural order (layer 2 before layer 10).
    Build it with :meth:`open` or :meth:`of`, not the constructor.
    """

    adapters: tuple[LoraAdapter, ...]
    base_model: str | None
    module_names: tuple[str, ...]
    _index: dict[str, int] = field(repr=False, compare=False, default_factory=dict)

    # -- building

    @classmethod
    def open(
        cls,
        adapters: Sequence[AdapterLike],
        *,
        names: Sequence[str | None] | None = None,
        revisions: Sequence[str | None] | None = None,
        allow_pickle: bool = False,
        base_model: str | None = None,
    ) -> AdapterSet:
        """Open paths / hub ids (``LoraAdapter`` objects are taken as they are) and check them.

        ``names``: one per adapter (None keeps the directory name). Explicit names must be distinct;
        directory names that collide get ``-2``, ``-3`` suffixes. ``base_model``: the recipe's base
        model; when given, adapters whose config names another base are accepted (the user vouches
        for them) with a warning.
        """
        if not adapters:
            raise RecipeError("no adapters given", fix="pass at least one LoRA adapter directory")
        for what, given in (("names", names), ("revisions", revisions)):
            if given is not None and len(given) != len(adapters):
                raise RecipeError(f"{len(given)} {what} for {len(adapters)} adapters", fix=f"give one of {what} per adapter")
        loaded = []
        for i, ref in enumerate(adapters):
            if isinstance(ref, LoraAdapter):
                loaded.append(ref)
            else:
                loaded.append(load_adapter(ref, revision=revisions[i] if revisions else None, allow_pickle=allow_pickle))
        return cls.of(loaded, names=names, base_model=base_model)

    @classmethod
    def of(cls, adapters: Sequence[LoraAdapter], *, names: Sequence[str | None] | None = None,
           base_model: str | None = None) -> AdapterSet:
        """Wrap adapters that are already open: name them, check them (the objects are not changed)."""
        adapters = list(adapters)
        if not adapters:
            raise RecipeError("no adapters given", fix="pass at least one LoRA adapter directory")
        if names is not None and len(names) != len(adapters):
            raise RecipeError(f"{len(names)} names for {len(adapters)} adapters", fix="give one name per adapter")
        named = _unique_names(adapters, list(names) if names is not None else [None] * len(adapters))
        resolved = check_compatible(named, base_model)
        modules = natural_sorted({m for a in named for m in a.modules})
        return cls(adapters=tuple(named), base_model=resolved, module_names=tuple(modules),
                   _index={a.name: i for i, a in enumerate(named)})

    def subset(self, names: Sequence[str]) -> AdapterSet:
        """The named adapters only (in that order), without re-checking."""
        picked = [self[n] for n in names]
        return AdapterSet(adapters=tuple(picked), base_model=self.base_model,
                          module_names=tuple(natural_sorted({m for a in picked for m in a.modules})),
                          _index={a.name: i for i, a in enumerate(picked)})

    # -- access

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[LoraAdapter]:
        return iter(self.adapters)

    def __getitem__(self, key: int | str) -> LoraAdapter:
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(key)
            return self.adapters[self._index[key]]
        return self.adapters[key]

    def index(self, name: str) -> int:
        return self._index[name]

    def present(self, module: str) -> tuple[int, ...]:
        """Indices of the adapters that have ``module``."""
        return tuple(i for i, a in enumerate(self.adapters) if module in a.modules)

    def info(self, module: str) -> ModuleInfo:
        """The module's shape and kind (the same in every adapter that has it: checked at open)."""
        for a in self.adapters:
            if module in a.modules:
                return a.modules[module]
        raise KeyError(module)

    def factors(self, module: str, *, device: str | torch.device = "cpu") -> dict[int, LoraFactors]:
        """Adapter index -> its factors of ``module`` (scale folded into B), for the adapters that have it."""
        return {i: self.adapters[i].factors(module, device=device) for i in self.present(module)}

    # -- what an output adapter inherits

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' common dtype, else float32 (what ``dtype: auto`` writes)."""
        return common_dtype([a.dtype for a in self.adapters])

    @property
    def targets(self) -> list[str] | str:
        """``target_modules`` for an output: the union of plain target lists, else the exact module names.

        Exact names whenever an input restricts layers (``layers_to_transform``) or uses a regex, so the
        output never targets a layer no input adapted.
        """
        return target_modules_for(list(self.adapters), list(self.module_names))

    @property
    def task_type(self) -> str | None:
        types = {a.config.get("task_type") for a in self.adapters}
        return types.pop() if len(types) == 1 else None

    @property
    def fan_in_fan_out(self) -> bool:
        """True for GPT-2-style ``Conv1D`` bases (weights stored d_in x d_out)."""
        return any(bool(a.config.get("fan_in_fan_out")) for a in self.adapters)

    @property
    def base_revisions(self) -> dict[str, str | None]:
        """Each adapter's base-model revision as its config records it (PEFT's ``revision``)."""
        return {a.name: a.config.get("revision") for a in self.adapters}

    def lora_config(self, modules: Sequence, *, base_model: str | None = None) -> dict:
        """A fresh PEFT config for output ``modules`` (``OutputModule``s) merged from this set."""
        from loramerge.io.writer import build_lora_config

        return build_lora_config(list(modules), base_model=base_model or self.base_model, target_modules=self.targets,
                                 task_type=self.task_type, fan_in_fan_out=self.fan_in_fan_out)


def _unique_names(adapters: list[LoraAdapter], names: list[str | None]) -> list[LoraAdapter]:
    explicit = [n for n in names if n]
    dup = [n for n, c in Counter(explicit).items() if c > 1]
    if dup:
        raise RecipeError(f"adapter name '{dup[0]}' is used twice", fix="give each adapter a distinct name")
    paths = Counter(a.source.local_path for a in adapters)
    twice = [p for p, c in paths.items() if c > 1]
    if twice:
        raise RecipeError("the same adapter is listed twice", path=str(twice[0]),
                          fix="list it once and raise its weight instead")
    taken = set(explicit)
    out = []
    for adapter, name in zip(adapters, names, strict=True):
        want = name or adapter.name
        if not name and want in taken:
            n = 2
            while f"{want}-{n}" in taken:
                n += 1
            log.info("two adapters are named '%s'; calling %s '%s-%d'", want, adapter.source.local_path, want, n)
            want = f"{want}-{n}"
        taken.add(want)
        out.append(adapter if want == adapter.name else replace(adapter, name=want))
    return out


def check_compatible(adapters: Sequence[LoraAdapter], base_model: str | None = None) -> str | None:
    """One base model and agreeing shapes; returns the base model an output should name.

    Raises IncompatibleAdaptersError naming the file, the module and the fix.
    """
    bases = {a.base_model for a in adapters if a.base_model}
    if base_model is None and len(bases) > 1:
        listing = "; ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(
            f"the adapters were trained on different base models ({listing})",
            path=str(next(a for a in adapters if a.base_model and a.base_model != adapters[0].base_model).source.local_path),
            fix="merge adapters of one base model; if these names denote the same weights, "
            "set base_model in the recipe to accept them",
        )
    if base_model is not None:
        for a in adapters:
            if a.base_model and a.base_model != base_model:
                log.warning("adapter '%s' names base model '%s'; accepted as '%s' (the recipe's base_model)",
                            a.name, a.base_model, base_model)
    revisions = {a.config.get("revision") for a in adapters} - {None}
    if len(revisions) > 1:
        log.warning("the adapters name different base-model revisions (%s); they are recorded in the output",
                    ", ".join(sorted(map(str, revisions))))
    seen: dict[str, tuple[LoraAdapter, ModuleInfo]] = {}
    for adapter in adapters:
        for name, info in adapter.modules.items():
            if name not in seen:
                seen[name] = (adapter, info)
                continue
            first, ref = seen[name]
            if (info.d_in, info.d_out, info.kind) != (ref.d_in, ref.d_out, ref.kind):
                raise IncompatibleAdaptersError(
                    f"shape mismatch: '{first.name}' has {ref.kind} {ref.d_out}x{ref.d_in}, "
                    f"'{adapter.name}' has {info.kind} {info.d_out}x{info.d_in}",
                    path=str(adapter.weights_path), module=name,
                    fix="these adapters belong to different base models; merge adapters of one base model",
                )
    return base_model or (bases.pop() if len(bases) == 1 else None)


def target_modules_for(adapters: Sequence[LoraAdapter], module_names: Sequence[str]) -> list[str] | str:
    """The union of the inputs' target lists when they are plain lists, else the exact module names."""
    lists = [a.config.get("target_modules") for a in adapters]
    plain = all(isinstance(t, list) for t in lists) and not any(a.config.get("layers_to_transform") for a in adapters)
    if plain:
        return sorted({t for tl in lists for t in tl})
    return natural_sorted(module_names)


__all__ = ["AdapterLike", "AdapterSet", "check_compatible", "target_modules_for"]
