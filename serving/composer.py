"""The composer: resolve a request's spec to a canonical composition and build its adapter once.

A mix is composed by the merge engine (``merge_modules`` over an ``AdapterSet``: the same driver,
checks, rank policy and config rules as ``loramerge merge``, so ``fan_in_fan_out`` and
``layers_to_transform`` adapters come out as PEFT composes them), exactly (an exact factored method: the
concatenation), and truncated by the factored SVD only when its rank exceeds the engine's
``max_lora_rank`` (the result says so). Built
adapters live in a content-addressed :class:`~loramerge.serving.cache.CompositionStore` that several
server processes may share. No vLLM import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from loramerge.core.adapter_set import AdapterSet
from loramerge.core.factored import RankPolicy, compress_factored
from loramerge.errors import IncompatibleAdaptersError, LoramergeError, NumericalError
from loramerge.io.writer import OutputModule, build_lora_config, write_adapter
from loramerge.merging.engine import MergePlan, merge_modules

from .bundles import BundleExtractor, default_bundle_extractors
from .cache import MANIFEST, ComposedAdapter, CompositionCache, CompositionStore
from .catalog import AdapterCatalog
from .errors import CompositionError, UnknownAdapterError
from .grammar import Composition, CompositionSpec, parse_model_field

VALID_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM accepts for ``max_lora_rank`` (its stacked LoRA buffers are sized to it)."""


class PromptRouter(Protocol):
    """What ``auto`` needs: ``route(prompts) -> [{adapter name: weight}, ...]`` (one dict per prompt).

    Every ``loramerge.routers`` router satisfies it.
    """

    def route(self, prompts: list[str]) -> list[dict[str, float]]: ...


@dataclass
class ComposerStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    shared_hits: int = 0
    """Compositions found on disk, written by another process (or an earlier run) sharing the cache dir."""
    truncations: int = 0
    build_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Built:
    """The result of :meth:`Composer.build`: the adapter (None for the base model) and how it was obtained."""

    composition: Composition
    adapter: ComposedAdapter | None
    cache_hit: bool
    seconds: float

    def describe(self) -> dict:
        if self.adapter is None:
            info = {"label": "base", "kind": "base", "key": None, "adapters": {}, "method": None,
                    "lora_name": None, "rank": 0, "source_rank": 0, "truncated": False, "max_rel_error": 0.0,
                    "routed": self.composition.routed}
        else:
            info = self.adapter.describe()
        return info | {"cache_hit": self.cache_hit, "compose_ms": round(self.seconds * 1000, 3)}


@dataclass
class _Modules:
    """A composition's modules before truncation, and what its config needs."""

    modules: list[OutputModule]
    config: dict
    dtype: torch.dtype
    source_rank: int
    """The rank before truncation (the concatenation's)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Composer:
    """Resolves specs to compositions and builds each composition's adapter once (bounded LRU on disk).

    ``max_rank``: the engine's ``max_lora_rank``; larger compositions are truncated by the factored
    SVD (QR + small SVD, never d_out x d_in) and reported. ``device``: where the composition and SVD
    run (``cuda`` when available). ``cache_dir``: where composed adapters are written (default: a
    temporary directory removed by :meth:`close`); several processes may share one, and what is in it
    outlives the process (bounded by each process's LRU while it runs). Thread-safe;
    concurrent requests for one key build it once.
    """

    def __init__(
        self,
        catalog: AdapterCatalog,
        *,
        max_rank: int | None = None,
        cache_dir: str | Path | None = None,
        cache_size: int | None = 64,
        device: str | None = None,
        router: PromptRouter | None = None,
        base_model: str | None = None,
        base_names: Sequence[str] = ("base",),
        bundle_extractors: Mapping[str, BundleExtractor] | None = None,
        on_build: Callable[[Built], None] | None = None,
    ):
        if max_rank is not None and max_rank not in VALID_MAX_LORA_RANKS:
            raise CompositionError(f"max_rank {max_rank} is not one vLLM accepts",
                                   fix=f"use one of {', '.join(map(str, VALID_MAX_LORA_RANKS))}")
        if cache_size is not None and cache_size < 1:
            raise CompositionError(f"cache size {cache_size} must be at least 1", fix="pass --cache-size 64")
        self.catalog = catalog
        self.bounds = catalog.bounds
        self.max_rank = max_rank
        self.device = device or default_device()
        self.router = router
        self.base_model = base_model
        self.base_names = tuple(base_names)
        self.bundle_extractors = dict(default_bundle_extractors() if bundle_extractors is None else bundle_extractors)
        self.on_build = on_build
        self._cache_dir = None if cache_dir is None else Path(cache_dir).expanduser().resolve()
        self._own_dir = cache_dir is None
        self._store: CompositionStore | None = None
        self.cache = CompositionCache(cache_size)
        self.stats = ComposerStats()
        self._ids: dict[str, int] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._zero: ComposedAdapter | None = None

    @property
    def store(self) -> CompositionStore:
        """The directory store, created on first use (a failed start leaves no directory behind)."""
        with self._lock:
            if self._store is None:
                root = self._cache_dir or Path(tempfile.mkdtemp(prefix="loramerge-compositions-"))
                self._cache_dir = root
                self._store = CompositionStore(root)
                self.cache.store = self._store
            return self._store

    @property
    def cache_dir(self) -> Path:
        return self.store.root

    # -- parsing and routing

    def parse(self, model: str | Mapping | None) -> CompositionSpec:
        return parse_model_field(model, bounds=self.bounds, base_names=self.base_names)

    def resolve_many(self, specs: Sequence[CompositionSpec], prompts: Sequence[str | None]) -> list[Composition]:
        """Canonical compositions; the router (one call for all ``auto`` prompts) fills in ``auto``."""
        auto = [i for i, s in enumerate(specs) if s.kind == "auto"]
        routed: dict[int, dict[str, float]] = {}
        if auto:
            if self.router is None:
                raise CompositionError("'auto' needs a router and this server has none",
                                       fix="start the server with --router DIR, or name an adapter or a mix")
            texts = [prompts[i] or "" for i in auto]
            weights = self.router.route(list(texts))
            if len(weights) != len(texts):
                raise LoramergeError(f"the router returned {len(weights)} routings for {len(texts)} prompts")
            routed = dict(zip(auto, weights, strict=True))
        return [self._canonical(s, routed.get(i)) for i, s in enumerate(specs)]

    def resolve(self, spec: CompositionSpec, prompt: str | None = None) -> Composition:
        return self.resolve_many([spec], [prompt])[0]

    def _canonical(self, spec: CompositionSpec, routed: Mapping[str, float] | None) -> Composition:
        if spec.kind == "base":
            return Composition(kind="base")
        if spec.kind == "bundle":
            return Composition(kind="bundle", bundle=spec.bundle)
        quantum = self.bounds.weight_quantum
        terms = spec.terms
        if spec.kind == "auto":
            quantum = self.bounds.route_quantum
            terms = tuple((self.bounds.check_name(str(n)), float(w)) for n, w in (routed or {}).items())
        kept = sorted((n, self.bounds.quantise(w, quantum)) for n, w in terms)
        kept = [(n, w) for n, w in kept if w != 0.0]
        for name, _ in kept:
            self.catalog.path_for(name)  # unknown or escaping names fail here, before any work
        if not kept:
            return Composition(kind="base", routed=spec.kind == "auto")
        if spec.kind == "adapter" or (len(kept) == 1 and kept[0][1] == 1.0 and spec.method == "task_arithmetic"
                                      and not spec.parameters):
            return Composition(kind="adapter", terms=tuple(kept), routed=spec.kind == "auto")
        return Composition(kind="mix", terms=tuple(kept), method=spec.method, parameters=spec.parameters,
                           routed=spec.kind == "auto")

    # -- keys and ids

    def canonical_key(self, composition: Composition) -> str:
        """sha256 over the adapters' identities (name + weights sha256), quantised weights, method, parameters."""
        if composition.kind == "bundle":
            kind, name, task = composition.bundle  # type: ignore[misc]
            path = self.catalog.bundle_path(name)
            ident: dict[str, Any] = {"bundle": [kind, name, task, _tree_digest(path)]}
        else:
            ident = {"terms": [[n, self.catalog.adapter(n).sha256, w] for n, w in composition.terms],
                     "method": composition.method, "parameters": [list(p) for p in composition.parameters]}
        ident["max_rank"] = self.max_rank
        ident["base_model"] = self.base_model
        text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def lora_int_id(self, key: str) -> int:
        """A stable, never reused integer per key (vLLM's adapter id), so compositions never share KV cache."""
        with self._lock:
            if key not in self._ids:
                self._ids[key] = len(self._ids) + 1
            return self._ids[key]

    # -- building

    def build(self, composition: Composition, *, lease: bool = False) -> Built:
        """The composition's adapter, from the cache or built now. The base model has none.

        ``lease``: also lease the directory (atomically), so it stays on disk until :meth:`release`.
        """
        started = time.perf_counter()
        self.stats.requests += 1
        if composition.kind == "base":
            return Built(composition, None, True, time.perf_counter() - started)
        key = self.canonical_key(composition)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            cached = self.cache.get(key, lease=lease)
            if cached is not None:
                self.stats.hits += 1
                return Built(composition, cached, True, time.perf_counter() - started)
            for _ in range(3):  # another process may remove a shared directory between adoption and lease
                adapter, shared = self._obtain(composition, key)
                if self.cache.put(adapter, lease=lease):
                    break
            else:
                raise LoramergeError("a composed adapter kept disappearing from the shared cache directory",
                                     path=str(self.cache_dir), fix="give each server a cache size that fits its load")
        with self._lock:
            self._key_locks.pop(key, None)
        if shared:
            self.stats.hits += 1
            self.stats.shared_hits += 1
            return Built(composition, adapter, True, time.perf_counter() - started)
        self.stats.misses += 1
        if adapter.truncated:
            self.stats.truncations += 1
        built = Built(composition, adapter, False, time.perf_counter() - started)
        self.stats.build_seconds.append(built.seconds)
        del self.stats.build_seconds[:-1000]
        if self.on_build is not None:
            self.on_build(built)
        return built

    def release(self, built: Built) -> None:
        """End a lease taken by ``build(..., lease=True)``."""
        if built.adapter is not None:
            self.cache.release(built.adapter.key)

    @contextlib.contextmanager
    def leased(self, composition: Composition) -> Iterator[Built]:
        """``with composer.leased(c) as built:`` the adapter directory exists for the whole block."""
        built = self.build(composition, lease=True)
        try:
            yield built
        finally:
            self.release(built)

    def _obtain(self, composition: Composition, key: str) -> tuple[ComposedAdapter, bool]:
        """(adapter, found on disk): the user's own directory, a shared one another process wrote, or a new one."""
        name, lora_id = f"lm-{key[:16]}", self.lora_int_id(key)
        if composition.kind == "adapter":
            adapter = self.catalog.adapter(composition.terms[0][0])
            rank = max(m.rank for m in adapter.modules.values())
            if self.max_rank is None or rank <= self.max_rank:
                return ComposedAdapter(key=key, composition=composition, lora_name=name, lora_int_id=lora_id,
                                       path=adapter.source.local_path, rank=rank, source_rank=rank,
                                       truncated=False, max_rel_error=0.0, owned=False), False
        dirname = key[:32]
        found = self.store.manifest(dirname, key)
        if found is None:
            composed, errors = self._compose(composition)
            out_modules, config = composed.modules, composed.config
            manifest = {"composition": composition.label, "key": key, "adapters": dict(composition.terms),
                        "method": composition.method, "max_rank": self.max_rank,
                        "rank": max(m.rank for m in out_modules), "source_rank": composed.source_rank,
                        "max_rel_error": max(errors, default=0.0)}

            def write(path: Path) -> None:
                write_adapter(path, out_modules, config, dtype=composed.dtype,
                              extra_files={MANIFEST: json.dumps(manifest, indent=2) + "\n"})

            self.store.publish(dirname, write)
            # whoever's rename won, the directory now holds this key's (identical) composition
            found, shared = self.store.manifest(dirname, key) or manifest, False
        else:
            shared = True
        return ComposedAdapter(key=key, composition=composition, lora_name=name, lora_int_id=lora_id,
                               path=self.store.path_for(dirname), rank=found["rank"],
                               source_rank=found["source_rank"], truncated=found["rank"] < found["source_rank"],
                               max_rel_error=found["max_rel_error"]), shared

    def _compose(self, composition: Composition) -> tuple[_Modules, list[float]]:
        """The composition's modules at most ``max_rank`` and each module's truncation error.

        A mix goes through the merge engine (``merge_modules`` over an ``AdapterSet``: the checks, rank
        policy and PEFT config rules of ``loramerge merge``); a bundle task is truncated the same way.
        """
        if composition.kind == "bundle":
            return self._fit_rank(self._bundle_modules(composition))
        opened = [self.catalog.adapter(n) for n, _ in composition.terms]  # each validated once, when first used
        try:
            adapters = AdapterSet.of(opened)  # merge's checks: one base model, agreeing shapes
        except IncompatibleAdaptersError as exc:
            raise IncompatibleAdaptersError(
                exc.message, path=exc.path, module=exc.module,
                fix="mix adapters trained on one base model; serve the others alone, or pre-merge them with "
                "`loramerge merge` and a recipe that sets base_model") from None
        plan = MergePlan.build(composition.method, [w for _, w in composition.terms],
                               parameters=dict(composition.parameters),
                               rank=RankPolicy("fixed", k=self.max_rank) if self.max_rank else "exact")
        merged = list(merge_modules(adapters, plan, device=self.device))
        modules = [m.module for m in merged]
        config = adapters.lora_config(modules, base_model=self.base_model)
        source_rank = max(sum(m.report.input_ranks) for m in merged)
        return _Modules(modules, config, adapters.dtype, source_rank), [m.report.rel_error for m in merged]

    def _bundle_modules(self, composition: Composition) -> _Modules:
        kind, name, task = composition.bundle  # type: ignore[misc]
        extractor = self.bundle_extractors.get(kind)
        if extractor is None:
            raise CompositionError(f"this server cannot read {kind} bundles",
                                   fix="pass an extractor for this bundle kind in bundle_extractors")
        path = self.catalog.bundle_path(name)
        try:
            factors = extractor(path, task)
        except KeyError:
            raise UnknownAdapterError(f"bundle '{name}' has no task '{task}'", path=str(path)) from None
        modules = [OutputModule(name=m, kind=f.kind, A=f.A.to(self.device, torch.float32),
                                B=f.B.to(self.device, torch.float32)) for m, f in sorted(factors.items())]
        if not modules:
            raise CompositionError(f"bundle '{name}' task '{task}' has no modules", path=str(path))
        for m in modules:
            if not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all()):
                raise NumericalError(f"bundle '{name}' task '{task}' holds NaN or Inf values", path=str(path),
                                     module=m.name, fix="rebuild the bundle from clean adapters")
        return _Modules(modules, {}, torch.float32, max(m.rank for m in modules))

    def _fit_rank(self, composed: _Modules) -> tuple[_Modules, list[float]]:
        """A bundle task at most ``max_rank`` (the engine's rank policy: the factored SVD); each error."""
        out, errors = [], []
        for m in composed.modules:
            if self.max_rank is not None and m.rank > self.max_rank:
                c = compress_factored(m.B, m.A, RankPolicy("fixed", k=self.max_rank), [m.rank])
                out.append(OutputModule(name=m.name, kind=m.kind, A=c.A.cpu(), B=c.B.cpu()))
                errors.append(c.rel_error)
            else:
                out.append(OutputModule(name=m.name, kind=m.kind, A=m.A.cpu(), B=m.B.cpu()))
        config = build_lora_config(out, base_model=self.base_model, target_modules=sorted(m.name for m in out))
        return _Modules(out, config, composed.dtype, composed.source_rank), errors

    # -- the zero adapter (vLLM CPU base-row workaround)

    def zero_adapter(self) -> ComposedAdapter | None:
        """A rank-1 adapter with B = 0 on one module: base-model output, exactly, through a LoRA slot.

        vLLM's CPU LoRA kernels give rows without a LoRA (index -1) the last slot's weights
        (docs/VLLM_CPU.md, pitfall 1). Sending base-model requests through this adapter means no row is
        ever without a LoRA, so no row can pick up another request's adapter.
        """
        with self._lock:
            if self._zero is not None and self._zero.path.is_dir():
                return self._zero
        names = self.catalog.names(limit=1)
        if not names:
            return None
        source = self.catalog.adapter(names[0])
        infos = sorted(source.modules.values(), key=lambda i: (i.kind != "linear", i.name))
        info = infos[0]
        module = OutputModule(name=info.name, kind=info.kind, A=torch.zeros(1, info.d_in), B=torch.zeros(info.d_out, 1))
        base_model = self.base_model or source.base_model
        config = build_lora_config([module], base_model=base_model, target_modules=[info.name],
                                   task_type=source.config.get("task_type"),
                                   fan_in_fan_out=bool(source.config.get("fan_in_fan_out")))
        ident = json.dumps([info.name, info.kind, info.d_in, info.d_out, base_model, config["fan_in_fan_out"]])
        key = "zero-" + hashlib.sha256(ident.encode()).hexdigest()
        dirname = key[:32]
        if self.store.manifest(dirname, key) is None:
            manifest = json.dumps({"key": key, "composition": "base", "rank": 1, "source_rank": 0,
                                   "max_rel_error": 0.0}) + "\n"
            self.store.publish(dirname, lambda path: write_adapter(path, [module], config, dtype=torch.float32,
                                                                   extra_files={MANIFEST: manifest}))
        zero = ComposedAdapter(key=key, composition=Composition(kind="base"), lora_name="loramerge-base",
                               lora_int_id=self.lora_int_id(key), path=self.store.path_for(dirname), rank=1,
                               source_rank=0, truncated=False, max_rel_error=0.0)
        with self._lock:
            self._zero = zero
        return zero

    def close(self) -> None:
        """Delete this composer's temporary cache directory. A ``cache_dir`` given by the caller is a shared,
        content-addressed cache: its compositions stay for other processes and later runs."""
        if self._own_dir:
            self.cache.clear()
            if self._store is not None:
                shutil.rmtree(self._store.root, ignore_errors=True)


def _tree_digest(path: Path, limit: int = 256) -> str:
    """A cheap identity of a bundle directory: names, sizes and mtimes of its files."""
    digest = hashlib.sha256()
    for i, child in enumerate(sorted(path.rglob("*"))):
        if i >= limit:
            break
        if child.is_file():
            st = child.stat()
            digest.update(f"{child.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


__all__ = ["VALID_MAX_LORA_RANKS", "Built", "Composer", "ComposerStats", "PromptRouter", "default_device"]
