"""Per-request composition: parse what a request runs with, build that adapter once, cache it.

A request names a base model, one adapter, a weighted mix (``mix:code=0.7,math=0.3`` or
``{"adapters": {...}, "method": ...}``), ``auto`` (a router picks the weights from the prompt), or a
task of a basis/Twin bundle (``basis:DIR/task``). Every form resolves to a :class:`Composition`
with a canonical key (adapter names and sha256s, quantised weights, method), and the composed
adapter is the exact concatenation ``B_cat = [w_1 B_1 | ...]``, ``A_cat = [A_1; ...]`` written as
an ordinary PEFT adapter directory, truncated by the factored SVD only when its rank exceeds the
engine's ``max_lora_rank`` (and the result says so). No vLLM import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from loramerge.core.adapter import LoraAdapter, LoraFactors, load_adapter
from loramerge.core.factored import RankPolicy, compress_factored
from loramerge.errors import IncompatibleAdaptersError, LoramergeError
from loramerge.io.writer import OutputModule, build_lora_config, write_adapter
from loramerge.merging.methods import Factored, ModuleInputs, get_method

VALID_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM accepts for ``max_lora_rank`` (its stacked LoRA buffers are sized to it)."""

BUNDLE_PREFIXES = ("basis", "twin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MANIFEST = "loramerge.json"


# --------------------------------------------------------------------------- errors


class CompositionError(LoramergeError):
    """A request names a composition that is malformed or out of bounds (HTTP 400)."""

    exit_code = 2
    http_status = 400


class UnknownAdapterError(CompositionError):
    """A request names an adapter, bundle or task that is not served (HTTP 404)."""

    http_status = 404


# --------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Bounds:
    """Limits on what one request may ask for, so a hostile request cannot exhaust the server."""

    max_adapters_per_mix: int = 8
    max_abs_weight: float = 8.0
    max_name_length: int = 64
    max_model_field_chars: int = 1024
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    weight_quantum: float = 1e-4
    """Weights are rounded to multiples of this before keying and composing (what runs is what is keyed)."""
    route_quantum: float = 0.01
    """Router weights are rounded more coarsely, so near-identical routings share one cached adapter."""

    def check_name(self, name: str, what: str = "adapter") -> str:
        if not isinstance(name, str) or not name:
            raise CompositionError(f"empty {what} name", fix="name an adapter listed by GET /v1/models")
        if len(name) > self.max_name_length:
            raise CompositionError(f"{what} name longer than {self.max_name_length} characters",
                                   fix="use a shorter name")
        if not NAME_PATTERN.match(name):
            raise CompositionError(
                f"{what} name {name[:80]!r} has characters outside [A-Za-z0-9._-] or does not start with a letter/digit",
                fix="adapter names are plain identifiers such as 'code' or 'math-v2', never paths",
            )
        return name

    def check_weight(self, name: str, weight: Any) -> float:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise CompositionError(f"weight of '{name}' must be a number, got {weight!r}")
        w = float(weight)
        if not math.isfinite(w) or abs(w) > self.max_abs_weight:
            raise CompositionError(f"weight of '{name}' is {weight!r}; it must be finite with |w| <= {self.max_abs_weight}",
                                   fix="use weights such as 0.7 and 0.3")
        return w

    def check_prompt_chars(self, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise CompositionError(f"prompt has {len(text)} characters; the limit is {self.max_prompt_chars}",
                                   fix="send a shorter prompt")

    def check_prompt_tokens(self, n: int, limit: int | None = None) -> None:
        cap = min(self.max_prompt_tokens, limit) if limit else self.max_prompt_tokens
        if n > cap:
            raise CompositionError(f"prompt has {n} tokens; the limit is {cap}", fix="send a shorter prompt")

    def quantise(self, weight: float, quantum: float | None = None) -> float:
        q = quantum or self.weight_quantum
        return round(round(weight / q) * q, 12)


# --------------------------------------------------------------------------- what a request asks for

SpecKind = Literal["base", "adapter", "mix", "auto", "bundle"]


@dataclass(frozen=True)
class CompositionSpec:
    """A parsed ``model`` field, before routing: ``auto`` still needs the prompt."""

    kind: SpecKind
    terms: tuple[tuple[str, float], ...] = ()
    method: str = "task_arithmetic"
    parameters: tuple[tuple[str, Any], ...] = ()
    bundle: tuple[str, str, str] | None = None
    """(kind, bundle directory name, task) for ``basis:DIR/task`` and ``twin:DIR/task``."""


@dataclass(frozen=True)
class Composition:
    """What one request runs with, canonical: terms sorted by name, weights quantised, zero terms dropped."""

    kind: Literal["base", "adapter", "mix", "bundle"]
    terms: tuple[tuple[str, float], ...] = ()
    method: str = "task_arithmetic"
    parameters: tuple[tuple[str, Any], ...] = ()
    bundle: tuple[str, str, str] | None = None
    routed: bool = False

    @property
    def label(self) -> str:
        """A name for the response, re-parseable as a ``model`` field."""
        if self.kind == "base":
            return "base"
        if self.kind == "adapter":
            return self.terms[0][0]
        if self.kind == "bundle":
            kind, name, task = self.bundle  # type: ignore[misc]
            return f"{kind}:{name}/{task}"
        body = ",".join(f"{n}={_fmt(w)}" for n, w in self.terms)
        suffix = "" if self.method == "task_arithmetic" and not self.parameters else f";method={self.method}"
        return f"mix:{body}{suffix}"


def _fmt(w: float) -> str:
    return f"{w:.6g}"


def _parse_mix_text(text: str, bounds: Bounds) -> CompositionSpec:
    body, _, options = text.partition(";")
    method = "task_arithmetic"
    if options:
        key, eq, value = options.partition("=")
        if key.strip() != "method" or not eq:
            raise CompositionError(f"unknown mix option {options!r}", fix="the only option is ';method=NAME'")
        method = value.strip()
    terms: dict[str, float] = {}
    parts = [p for p in body.split(",")]
    if not body.strip():
        raise CompositionError("empty mix", fix="write mix:NAME=WEIGHT,NAME=WEIGHT, e.g. mix:code=0.7,math=0.3")
    if len(parts) > bounds.max_adapters_per_mix:
        raise CompositionError(f"mix of {len(parts)} adapters; the limit is {bounds.max_adapters_per_mix}",
                               fix="mix fewer adapters per request")
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise CompositionError(f"mix term {part[:80]!r} has no '=WEIGHT'", fix="write mix:code=0.7,math=0.3")
        bounds.check_name(name)
        try:
            weight = float(value)
        except ValueError:
            raise CompositionError(f"weight of '{name}' is not a number: {value[:40]!r}") from None
        if name in terms:
            raise CompositionError(f"adapter '{name}' appears twice in the mix", fix="list each adapter once")
        terms[name] = bounds.check_weight(name, weight)
    return CompositionSpec(kind="mix", terms=tuple(terms.items()), method=_check_method_name(method))


def _parse_mix_dict(data: Mapping, bounds: Bounds) -> CompositionSpec:
    unknown = set(data) - {"adapters", "method", "parameters"}
    if unknown:
        raise CompositionError(f"unknown composition field(s) {sorted(unknown)}",
                               fix="a composition is {adapters: {name: weight}, method?: NAME, parameters?: {...}}")
    adapters = data.get("adapters")
    if not isinstance(adapters, Mapping) or not adapters:
        raise CompositionError("composition.adapters must be a non-empty object {name: weight}")
    if len(adapters) > bounds.max_adapters_per_mix:
        raise CompositionError(f"mix of {len(adapters)} adapters; the limit is {bounds.max_adapters_per_mix}",
                               fix="mix fewer adapters per request")
    terms = tuple((bounds.check_name(str(n)), bounds.check_weight(str(n), w)) for n, w in adapters.items())
    method = data.get("method", "task_arithmetic")
    if not isinstance(method, str):
        raise CompositionError("composition.method must be a string")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping) or len(parameters) > 8:
        raise CompositionError("composition.parameters must be a small object")
    params = tuple(sorted((str(k), v) for k, v in parameters.items()))
    for key, value in params:
        if not isinstance(value, (int, float, bool, str)) or (isinstance(value, str) and len(value) > 64):
            raise CompositionError(f"composition parameter '{key}' must be a number, bool or short string")
    return CompositionSpec(kind="mix", terms=terms, method=_check_method_name(method), parameters=params)


def _check_method_name(name: str) -> str:
    """Only exact, factored methods compose per request (a concatenation, no dense pass)."""
    try:
        method = get_method(name)
    except LoramergeError as exc:
        raise CompositionError(exc.message, fix=exc.fix) from None
    if method.kind != "factored" or not method.exact:
        raise CompositionError(
            f"method '{name}' is not an exact factored method, so it cannot be composed per request",
            fix="use task_arithmetic (linear), average or cat per request; pre-merge other methods with `loramerge merge`",
        )
    return method.name


def parse_model_field(
    model: str | Mapping | None, *, bounds: Bounds = Bounds(), base_names: Sequence[str] = ("base",)
) -> CompositionSpec:
    """Parse a request's ``model`` (or structured ``composition``) into a spec. Raises CompositionError."""
    if isinstance(model, Mapping):
        return _parse_mix_dict(model, bounds)
    if not isinstance(model, str) or not model.strip():
        raise CompositionError("the request names no model",
                               fix="set model to an adapter name, 'mix:a=0.7,b=0.3', 'auto' or the base model")
    if len(model) > bounds.max_model_field_chars:
        raise CompositionError(f"model field longer than {bounds.max_model_field_chars} characters")
    text = model.strip()
    if text in base_names:
        return CompositionSpec(kind="base")
    if text == "auto":
        return CompositionSpec(kind="auto")
    prefix, colon, rest = text.partition(":")
    if colon and prefix == "mix":
        return _parse_mix_text(rest, bounds)
    if colon and prefix in BUNDLE_PREFIXES:
        bundle, slash, task = rest.partition("/")
        if not slash:
            raise CompositionError(f"'{text[:80]}' names no task", fix=f"write {prefix}:BUNDLE_DIR/TASK")
        bounds.check_name(bundle, "bundle")
        bounds.check_name(task, "task")
        return CompositionSpec(kind="bundle", bundle=(prefix, bundle, task))
    if colon:
        raise CompositionError(f"unknown model prefix '{prefix[:40]}:'",
                               fix="use an adapter name, 'mix:...', 'basis:DIR/task', 'twin:DIR/task' or 'auto'")
    return CompositionSpec(kind="adapter", terms=((bounds.check_name(text), 1.0),))


# --------------------------------------------------------------------------- adapters on disk


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


@dataclass
class _Loaded:
    adapter: LoraAdapter
    stamp: tuple[int, int]


class AdapterCatalog:
    """The adapters (and bundles) a server may use: explicit ``name=path`` entries plus names under roots.

    A name under a root resolves to ``root/name`` and must stay inside the root after symlinks are
    followed, so no request can reach outside the configured directories.
    """

    def __init__(self, adapters: Mapping[str, str | Path] | None = None, roots: Sequence[str | Path] = (),
                 *, bounds: Bounds = Bounds()):
        self.bounds = bounds
        self.explicit: dict[str, Path] = {}
        for name, path in (adapters or {}).items():
            bounds.check_name(name)
            resolved = Path(path).expanduser().resolve()
            if not (resolved / "adapter_config.json").is_file():
                raise CompositionError(f"adapter '{name}' is not a PEFT adapter directory", path=str(resolved),
                                       fix="give NAME=DIR where DIR holds adapter_config.json")
            self.explicit[name] = resolved
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise CompositionError("adapter root is not a directory", path=str(root))
        self._loaded: dict[str, _Loaded] = {}
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
        found = self._under_roots(name, "adapter_config.json")
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
                if NAME_PATTERN.match(child.name) and (child / "adapter_config.json").is_file() \
                        and _inside(child.resolve(), root) and child.name not in names:
                    names.append(child.name)
        return names

    def adapter(self, name: str) -> LoraAdapter:
        """The opened adapter, reopened when its weights file changed on disk (so the sha256 stays true)."""
        path = self.path_for(name)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is not None and cached.stamp == _stamp(cached.adapter.weights_path) \
                    and cached.adapter.source.local_path == path:
                return cached.adapter
            adapter = load_adapter(path, name=name)
            self._loaded[name] = _Loaded(adapter, _stamp(adapter.weights_path))
            return adapter


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------- bundles (basis / Twin) seam


class BundleExtractor(Protocol):
    """Rebuild one task's adapter from a bundle directory: module name -> factors (scale folded)."""

    def __call__(self, bundle_dir: Path, task: str) -> Mapping[str, LoraFactors]: ...


def default_bundle_extractors() -> dict[str, BundleExtractor]:
    """``basis`` and ``twin`` extractors, when loramerge.artifacts.basis / loramerge.artifacts.twin provide ``task_factors``."""
    extractors: dict[str, BundleExtractor] = {}
    for prefix, module_name in (("basis", "loramerge.artifacts.basis"), ("twin", "loramerge.artifacts.twin")):
        try:
            module = __import__(module_name, fromlist=["task_factors"])
        except ImportError:
            continue
        fn = getattr(module, "task_factors", None)
        if callable(fn):
            extractors[prefix] = fn
    return extractors


# --------------------------------------------------------------------------- the cache of written adapters


@dataclass(frozen=True)
class ComposedAdapter:
    """A composition written as a PEFT adapter directory, what vLLM (or PEFT) loads."""

    key: str
    """sha256 of the canonical key: adapter names and sha256s, quantised weights, method, parameters."""
    composition: Composition
    lora_name: str
    lora_int_id: int
    path: Path
    rank: int
    source_rank: int
    truncated: bool
    max_rel_error: float
    owned: bool = True
    """False when ``path`` is the user's own adapter directory (never deleted)."""

    def describe(self) -> dict:
        return {
            "label": self.composition.label, "kind": self.composition.kind, "key": self.key,
            "adapters": dict(self.composition.terms), "method": self.composition.method,
            "lora_name": self.lora_name, "rank": self.rank, "source_rank": self.source_rank,
            "truncated": self.truncated, "max_rel_error": self.max_rel_error, "routed": self.composition.routed,
        }


@dataclass
class _Entry:
    adapter: ComposedAdapter
    leases: int = 0


class CompositionCache:
    """A bounded LRU of written adapter directories. Leased entries (in-flight requests) are never evicted.

    ``capacity=None`` never evicts (the vLLM resolver mode, where the server may reload a path at any time).
    """

    def __init__(self, capacity: int | None = 64):
        if capacity is not None and capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, *, lease: bool = False) -> ComposedAdapter | None:
        """The entry (most recently used now), leased atomically when ``lease``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.adapter.path.is_dir():
                return None
            self._entries.move_to_end(key)
            entry.leases += int(lease)
            return entry.adapter

    def put(self, adapter: ComposedAdapter, *, lease: bool = False) -> None:
        with self._lock:
            old = self._entries.get(adapter.key)
            self._entries[adapter.key] = _Entry(adapter, leases=(old.leases if old else 0) + int(lease))
            self._entries.move_to_end(adapter.key)
            victims = self._pick_victims()
        for victim in victims:
            _remove_dir(victim)

    def _pick_victims(self) -> list[ComposedAdapter]:
        if self.capacity is None:
            return []
        victims = []
        for key in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            entry = self._entries[key]
            if entry.leases == 0:
                del self._entries[key]
                victims.append(entry.adapter)
                self.evictions += 1
        return victims

    def acquire(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases += 1

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases = max(entry.leases - 1, 0)
            victims = self._pick_victims()
        for victim in victims:
            _remove_dir(victim)

    def leases(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.leases if entry else 0

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            _remove_dir(entry.adapter)


def _remove_dir(adapter: ComposedAdapter) -> None:
    if adapter.owned:
        shutil.rmtree(adapter.path, ignore_errors=True)


# --------------------------------------------------------------------------- the composer


class Router(Protocol):
    """Anything with ``route(prompts) -> [{adapter name: weight}, ...]`` (one dict per prompt)."""

    def route(self, prompts: list[str]) -> list[dict[str, float]]: ...


@dataclass
class ComposerStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Composer:
    """Resolves specs to compositions and builds each composition's adapter once (bounded LRU on disk).

    ``max_rank``: the engine's ``max_lora_rank``; larger compositions are truncated by the factored
    SVD (QR + small SVD, never d_out x d_in) and reported. ``device``: where the concatenation and
    SVD run (``cuda`` when available). Thread-safe; concurrent requests for one key build it once.
    """

    def __init__(
        self,
        catalog: AdapterCatalog,
        *,
        max_rank: int | None = None,
        cache_dir: str | Path | None = None,
        cache_size: int | None = 64,
        device: str | None = None,
        router: Router | None = None,
        base_model: str | None = None,
        base_names: Sequence[str] = ("base",),
        bundle_extractors: Mapping[str, BundleExtractor] | None = None,
        on_build: Callable[[Built], None] | None = None,
    ):
        if max_rank is not None and max_rank not in VALID_MAX_LORA_RANKS:
            raise CompositionError(f"max_rank {max_rank} is not one vLLM accepts",
                                   fix=f"use one of {', '.join(map(str, VALID_MAX_LORA_RANKS))}")
        self.catalog = catalog
        self.bounds = catalog.bounds
        self.max_rank = max_rank
        self.device = device or default_device()
        self.router = router
        self.base_model = base_model
        self.base_names = tuple(base_names)
        self.bundle_extractors = dict(default_bundle_extractors() if bundle_extractors is None else bundle_extractors)
        self.on_build = on_build
        self._own_dir = cache_dir is None
        self.cache_dir = Path(tempfile.mkdtemp(prefix="loramerge-compositions-")) if cache_dir is None \
            else Path(cache_dir).expanduser().resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache = CompositionCache(cache_size)
        self.stats = ComposerStats()
        self._ids: dict[str, int] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._zero: ComposedAdapter | None = None

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
            ident = {"bundle": [kind, name, task, _tree_digest(path)]}
        else:
            ident = {"terms": [[n, self.catalog.adapter(n).sha256, w] for n, w in composition.terms],
                     "method": composition.method, "parameters": [list(p) for p in composition.parameters]}
        ident["max_rank"] = self.max_rank
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
            adapter = self._build_uncached(composition, key)
            self.cache.put(adapter, lease=lease)
        with self._lock:
            self._key_locks.pop(key, None)
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

    def _build_uncached(self, composition: Composition, key: str) -> ComposedAdapter:
        name = f"lm-{key[:16]}"
        lora_id = self.lora_int_id(key)
        if composition.kind == "adapter":
            adapter = self.catalog.adapter(composition.terms[0][0])
            rank = max(m.rank for m in adapter.modules.values())
            if self.max_rank is None or rank <= self.max_rank:
                return ComposedAdapter(key=key, composition=composition, lora_name=name, lora_int_id=lora_id,
                                       path=adapter.source.local_path, rank=rank, source_rank=rank, truncated=False,
                                       max_rel_error=0.0, owned=False)
        modules, source_rank, config, dtype = self._compose_modules(composition)
        out_modules, errors = self._fit_rank(modules)
        config = build_lora_config(out_modules, base_model=config["base_model"], target_modules=config["targets"],
                                   task_type=config["task_type"])
        manifest = {"composition": composition.label, "key": key, "adapters": dict(composition.terms),
                    "method": composition.method, "max_rank": self.max_rank,
                    "max_rel_error": max(errors, default=0.0)}
        path = write_adapter(self.cache_dir / key[:32], out_modules, config, dtype=dtype, force=True,
                             extra_files={_MANIFEST: json.dumps(manifest, indent=2) + "\n"})
        rank = max(m.rank for m in out_modules)
        return ComposedAdapter(key=key, composition=composition, lora_name=name, lora_int_id=lora_id, path=path,
                               rank=rank, source_rank=source_rank, truncated=rank < source_rank,
                               max_rel_error=max(errors, default=0.0))

    def _compose_modules(self, composition: Composition) -> tuple[list[OutputModule], int, dict, torch.dtype]:
        """Exact per-module composition (before any truncation)."""
        if composition.kind == "bundle":
            return self._bundle_modules(composition)
        adapters = [self.catalog.adapter(n) for n, _ in composition.terms]
        weights = [w for _, w in composition.terms]
        _check_shapes(adapters)
        method = get_method(composition.method)
        try:
            cfg = method.make_config(dict(composition.parameters))
        except Exception as exc:  # pydantic ValidationError: a bad request parameter
            raise CompositionError(f"bad parameters for method '{method.name}': {exc}") from None
        modules: list[OutputModule] = []
        source_rank = 0
        for module in sorted({m for a in adapters for m in a.modules}):
            present = [i for i, a in enumerate(adapters) if module in a.modules]
            factors = tuple(adapters[i].factors(module, device=self.device) for i in present)
            inputs = ModuleInputs(name=module, factors=factors, weights=tuple(weights[i] for i in present),
                                  adapter_names=tuple(adapters[i].name for i in present))
            result = method.fn(cfg, inputs)
            assert isinstance(result, Factored), "exact factored methods return Factored"
            modules.append(OutputModule(name=module, kind=factors[0].kind, A=result.A, B=result.B))
            source_rank = max(source_rank, result.A.shape[0])
        bases = {a.base_model for a in adapters if a.base_model}
        targets = sorted({t for a in adapters if isinstance(a.config.get("target_modules"), list)
                          for t in a.config["target_modules"]}) or sorted(m.name for m in modules)
        task_types = {a.config.get("task_type") for a in adapters}
        config = {"base_model": self.base_model or (bases.pop() if len(bases) == 1 else None), "targets": targets,
                  "task_type": task_types.pop() if len(task_types) == 1 else None}
        dtypes = {a.dtype for a in adapters}
        return modules, source_rank, config, dtypes.pop() if len(dtypes) == 1 else torch.float32

    def _bundle_modules(self, composition: Composition) -> tuple[list[OutputModule], int, dict, torch.dtype]:
        kind, name, task = composition.bundle  # type: ignore[misc]
        extractor = self.bundle_extractors.get(kind)
        if extractor is None:
            raise CompositionError(f"this server cannot read {kind} bundles",
                                   fix=f"install a loramerge with loramerge.{kind}.task_factors, or pass an extractor")
        path = self.catalog.bundle_path(name)
        try:
            factors = extractor(path, task)
        except KeyError:
            raise UnknownAdapterError(f"bundle '{name}' has no task '{task}'", path=str(path)) from None
        modules = [OutputModule(name=m, kind=f.kind, A=f.A.to(self.device, torch.float32),
                                B=f.B.to(self.device, torch.float32)) for m, f in sorted(factors.items())]
        if not modules:
            raise CompositionError(f"bundle '{name}' task '{task}' has no modules", path=str(path))
        config = {"base_model": self.base_model, "targets": sorted(m.name for m in modules), "task_type": None}
        return modules, max(m.rank for m in modules), config, torch.float32

    def _fit_rank(self, modules: list[OutputModule]) -> tuple[list[OutputModule], list[float]]:
        """Truncate modules above ``max_rank`` by the factored SVD; report each relative error."""
        out, errors = [], []
        for m in modules:
            if self.max_rank is not None and m.rank > self.max_rank:
                c = compress_factored(m.B, m.A, RankPolicy("fixed", k=self.max_rank), [m.rank])
                out.append(OutputModule(name=m.name, kind=m.kind, A=c.A.cpu(), B=c.B.cpu()))
                errors.append(c.rel_error)
            else:
                out.append(OutputModule(name=m.name, kind=m.kind, A=m.A.cpu(), B=m.B.cpu()))
        return out, errors

    # -- the zero adapter (vLLM CPU base-row workaround)

    def zero_adapter(self) -> ComposedAdapter | None:
        """A rank-1 adapter with B = 0 on one module: base-model output, exactly, through a LoRA slot.

        vLLM's CPU LoRA kernels give rows without a LoRA (index -1) the last slot's weights
        (vllm-cpu.md, pitfall 1). Sending base-model requests through this adapter means no row is
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
        config = build_lora_config([module], base_model=self.base_model or source.base_model,
                                   target_modules=[info.name], task_type=source.config.get("task_type"))
        path = write_adapter(self.cache_dir / "zero-base", [module], config, dtype=torch.float32, force=True)
        key = "zero-base"
        zero = ComposedAdapter(key=key, composition=Composition(kind="base"), lora_name="loramerge-base",
                               lora_int_id=self.lora_int_id(key), path=path, rank=1, source_rank=0,
                               truncated=False, max_rel_error=0.0)
        with self._lock:
            self._zero = zero
        return zero

    def close(self) -> None:
        """Delete the directories this composer wrote (its own temporary cache directory included)."""
        self.cache.clear()
        if self._own_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def _check_shapes(adapters: list[LoraAdapter]) -> None:
    seen: dict[str, tuple[str, int, int, str]] = {}
    for adapter in adapters:
        for name, info in adapter.modules.items():
            first = seen.setdefault(name, (adapter.name, info.d_in, info.d_out, info.kind))
            if first[1:] != (info.d_in, info.d_out, info.kind):
                raise IncompatibleAdaptersError(
                    f"adapters '{first[0]}' and '{adapter.name}' disagree on this module's shape",
                    module=name, fix="mix adapters of the same base model only")


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


__all__ = [
    "VALID_MAX_LORA_RANKS", "AdapterCatalog", "Bounds", "BundleExtractor", "Built", "ComposedAdapter", "Composer",
    "Composition", "CompositionCache", "CompositionError", "CompositionSpec", "Router", "UnknownAdapterError",
    "parse_model_field",
]
