"""The adapters (and bundles) a server may use, each opened and validated once, when first used.

Validation is what ``merge`` checks (the adapter loader's config and shape checks, finite values in every
tensor) plus a check against the served base model's module shapes, so the server never answers with
an adapter ``merge`` would refuse. A failure is remembered until the adapter's files change.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.core.adapter import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, LoraAdapter, load_adapter
from loramerge.errors import AdapterLoadError, IncompatibleAdaptersError, LoramergeError

from .bounds import NAME_PATTERN, Bounds
from .errors import CompositionError, UnknownAdapterError


@dataclass(frozen=True)
class BaseModules:
    """The served base model's 2-D weight shapes (module name -> shape as stored), for adapter checks."""

    shapes: Mapping[str, tuple[int, ...]]
    source: str

    @classmethod
    def from_model(cls, model: Any) -> BaseModules:
        shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()
                  if getattr(getattr(m, "weight", None), "dim", lambda: 0)() == 2}
        return cls(shapes, source=type(model).__name__)

    @classmethod
    def from_dir(cls, path: str | Path) -> BaseModules | None:
        """From the safetensors headers of a local checkpoint (None when there is none to read)."""
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        if not files:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = tuple(fh.get_slice(key).get_shape())
                    if key.endswith(".weight") and len(shape) == 2:
                        shapes[key[: -len(".weight")]] = shape
        return cls(shapes, source=str(path))

    def lookup(self, module: str) -> tuple[int, ...] | None:
        if module in self.shapes:
            return self.shapes[module]
        head, _, tail = module.partition(".")
        return self.shapes.get(tail) if tail else None

    def check(self, adapter: LoraAdapter) -> None:
        """Every module the adapter targets exists in the base with the shape the adapter was trained for."""
        transposed_ok = bool(adapter.config.get("fan_in_fan_out"))
        for name, info in sorted(adapter.modules.items()):
            shape = self.lookup(name)
            if shape is None:
                if name.rsplit(".", 1)[-1] == "lm_head":
                    continue  # tied to the input embeddings: not stored in the checkpoint
                raise IncompatibleAdaptersError(
                    f"adapter '{adapter.name}' targets a module the served base model does not have",
                    path=str(adapter.source.local_path), module=name,
                    fix="serve adapters trained on this base model only")
            want = {(info.d_in, info.d_out)} if info.kind == "embedding" else {(info.d_out, info.d_in)}
            if transposed_ok and info.kind == "linear":
                want.add((info.d_in, info.d_out))  # Conv1D (GPT-2) stores (d_in, d_out)
            if shape not in want:
                raise IncompatibleAdaptersError(
                    f"adapter '{adapter.name}' does not fit the served base model: the base weight is "
                    f"{'x'.join(map(str, shape))}, the adapter's {info.kind} delta is {info.d_out}x{info.d_in}",
                    path=str(adapter.source.local_path), module=name,
                    fix="serve adapters trained on this base model only")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _stamp(path: Path) -> tuple:
    """What identifies an adapter directory's content cheaply: mtime and size of its config and weights."""
    out = []
    for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME):
        try:
            st = (path / name).stat()
        except OSError:
            continue
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass
class _Checked:
    stamp: tuple
    path: Path
    adapter: LoraAdapter | None = None
    error: LoramergeError | None = None


def validate_adapter(adapter: LoraAdapter, base: BaseModules | None = None) -> None:
    """What ``merge`` checks on an input, once for the whole adapter: every tensor read and finite."""
    for module in adapter.modules:
        try:
            adapter.factors(module)  # raises NumericalError on NaN/Inf, AdapterLoadError on damage
        except ValueError as exc:
            raise AdapterLoadError(f"adapter '{adapter.name}' has factors that do not chain: {exc}",
                                   path=str(adapter.weights_path), module=module,
                                   fix="the adapter file is damaged; re-save it with PEFT") from None
    if base is not None:
        base.check(adapter)


class AdapterCatalog:
    """The adapters (and bundles) a server may use: explicit ``name=path`` entries plus names under roots.

    A name under a root resolves to ``root/name`` and must stay inside the root after symlinks are
    followed, so no request can reach outside the configured directories. ``base``: the served base
    model's shapes (set by the engine), checked against every adapter.
    """

    def __init__(self, adapters: Mapping[str, str | Path] | None = None, roots: Sequence[str | Path] = (),
                 *, bounds: Bounds = Bounds(), base: BaseModules | None = None):
        self.bounds = bounds
        self.base = base
        self.explicit: dict[str, Path] = {}
        for name, path in (adapters or {}).items():
            bounds.check_name(name)
            resolved = Path(path).expanduser().resolve()
            if not (resolved / CONFIG_NAME).is_file():
                raise CompositionError(f"adapter '{name}' is not a PEFT adapter directory", path=str(resolved),
                                       fix="give NAME=DIR where DIR holds adapter_config.json")
            self.explicit[name] = resolved
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise CompositionError("adapter root is not a directory", path=str(root))
        self._checked: dict[str, _Checked] = {}
        self._lock = threading.Lock()

    def _under_roots(self, name: str, marker: str | None) -> Path | None:
        for root in self.roots:
            candidate = (root / name).resolve()
            if not _inside(candidate, root) or candidate == root:
                raise CompositionError(f"'{name}' resolves outside the adapter root", path=str(root),
                                       fix="adapters must live inside the configured roots (no links out)")
            if candidate.is_dir() and (marker is None or (candidate / marker).is_file()):
                return candidate
        return None

    def path_for(self, name: str) -> Path:
        self.bounds.check_name(name)
        if name in self.explicit:
            return self.explicit[name]
        found = self._under_roots(name, CONFIG_NAME)
        if found is None:
            raise UnknownAdapterError(f"unknown adapter '{name}'", fix="GET /v1/models lists the served adapters")
        return found

    def bundle_path(self, name: str) -> Path:
        self.bounds.check_name(name, "bundle")
        if name in self.explicit:
            return self.explicit[name]
        found = self._under_roots(name, None)
        if found is None:
            raise UnknownAdapterError(f"unknown bundle '{name}'", fix="bundles live inside the adapter roots")
        return found

    def names(self, limit: int = 1000) -> list[str]:
        """Explicit names plus the adapter directories directly under each root."""
        names = list(self.explicit)
        for root in self.roots:
            for child in sorted(root.iterdir()):
                if len(names) >= limit:
                    return names
                if NAME_PATTERN.match(child.name) and (child / CONFIG_NAME).is_file() \
                        and _inside(child.resolve(), root) and child.name not in names:
                    names.append(child.name)
        return names

    def adapter(self, name: str) -> LoraAdapter:
        """The opened, validated adapter; reopened (and revalidated) when its files change on disk.

        Raises the loader's error (or NumericalError, IncompatibleAdaptersError) when it cannot be served;
        the verdict is kept until the files change, so a bad adapter costs one read, not one per request.
        """
        path = self.path_for(name)
        stamp = _stamp(path)
        with self._lock:
            checked = self._checked.get(name)
            if checked is None or checked.stamp != stamp or checked.path != path:
                checked = _Checked(stamp=stamp, path=path)
                try:
                    checked.adapter = load_adapter(path, name=name)
                    validate_adapter(checked.adapter, self.base)
                except LoramergeError as exc:
                    checked.adapter, checked.error = None, exc
                self._checked[name] = checked
        if checked.error is not None:
            raise checked.error
        assert checked.adapter is not None
        return checked.adapter


__all__ = ["AdapterCatalog", "BaseModules", "validate_adapter"]
