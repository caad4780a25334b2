"""The ``model`` grammar: what a request runs with, parsed into a spec and made canonical.

A request names the base model, one adapter, a weighted mix (``mix:code=0.7,math=0.3;method=NAME`` or
``{"adapters": {...}, "method": ..., "parameters": {...}}``), ``auto`` (a router picks the weights from
the prompt) or a task of a basis/Twin bundle (``basis:DIR/task``, ``twin:DIR/task``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from loramerge.errors import LoramergeError
from loramerge.merging.methods import get_method

from .bounds import Bounds
from .errors import CompositionError

BUNDLE_PREFIXES = ("basis", "twin")

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
        body = ",".join(f"{n}={w:.6g}" for n, w in self.terms)
        suffix = "" if self.method == "task_arithmetic" and not self.parameters else f";method={self.method}"
        return f"mix:{body}{suffix}"


def _check_count(n: int, bounds: Bounds) -> None:
    if n > bounds.max_adapters_per_mix:
        raise CompositionError(f"mix of {n} adapters; the limit is {bounds.max_adapters_per_mix}",
                               fix="mix fewer adapters per request")


def _parse_mix_text(text: str, bounds: Bounds) -> CompositionSpec:
    body, _, options = text.partition(";")
    method = "task_arithmetic"
    if options:
        key, eq, value = options.partition("=")
        if key.strip() != "method" or not eq:
            raise CompositionError(f"unknown mix option {options!r}", fix="the only option is ';method=NAME'")
        method = value.strip()
    if not body.strip():
        raise CompositionError("empty mix", fix="write mix:NAME=WEIGHT,NAME=WEIGHT, e.g. mix:code=0.7,math=0.3")
    parts = body.split(",")
    _check_count(len(parts), bounds)
    terms: dict[str, float] = {}
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
    return CompositionSpec(kind="mix", terms=tuple(terms.items()), method=check_method_name(method))


def _parse_mix_dict(data: Mapping, bounds: Bounds) -> CompositionSpec:
    unknown = set(data) - {"adapters", "method", "parameters"}
    if unknown:
        raise CompositionError(f"unknown composition field(s) {sorted(unknown)}",
                               fix="a composition is {adapters: {name: weight}, method?: NAME, parameters?: {...}}")
    adapters = data.get("adapters")
    if not isinstance(adapters, Mapping) or not adapters:
        raise CompositionError("composition.adapters must be a non-empty object {name: weight}")
    _check_count(len(adapters), bounds)
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
    return CompositionSpec(kind="mix", terms=terms, method=check_method_name(method), parameters=params)


def check_method_name(name: str) -> str:
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


__all__ = ["BUNDLE_PREFIXES", "Composition", "CompositionSpec", "SpecKind", "check_method_name", "parse_model_field"]
