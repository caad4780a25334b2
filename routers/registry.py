"""The router registry, built here in one place: kind -> class (no registration by import side effect).

``load_router(dir)`` opens any router artifact; ``router_options(kind, overrides)`` turns the settings given
to ``loramerge route train`` into the kind's typed ``Options``, refusing settings the kind does not take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from loramerge.errors import RecipeError

from .arrow import ArrowRouter
from .artifact import read_artifact
from .base import Router, from_artifact
from .classifier import ClassifierRouter
from .controller import GatedLora
from .embedders import Embedder
from .lorahub import LoraHubRouter, StaticRouter
from .moe import GateRouter
from .similarity import CentroidRouter, NearestNeighbourRouter

ROUTERS: Mapping[str, type[Router]] = MappingProxyType({cls.kind: cls for cls in (
    CentroidRouter, NearestNeighbourRouter, ClassifierRouter, ArrowRouter, GateRouter, StaticRouter, LoraHubRouter,
)})
ROUTER_KINDS = ROUTERS  # the old name
TRAINABLE_KINDS: tuple[str, ...] = tuple(kind for kind, cls in ROUTERS.items() if cls.Options is not None)


def router_class(kind: str, *, trainable: bool = False) -> type[Router]:
    kinds = TRAINABLE_KINDS if trainable else tuple(ROUTERS)
    if kind not in kinds:
        raise RecipeError(f"unknown router kind '{kind}'", fix=f"use one of: {', '.join(kinds)}")
    return ROUTERS[kind]


def router_options(kind: str, overrides: Mapping[str, Any]) -> Any:
    """The kind's ``Options`` with ``overrides`` (settings given on the command line; None = not given) applied."""
    cls = router_class(kind, trainable=True)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        takes = ", ".join("--" + f.replace("_", "-") for f in sorted(fields)) or "none of these settings"
        raise RecipeError(f"{flag} does not apply to a {kind} router", fix=f"a {kind} router takes {takes}")
    return cls.Options(**given)


def load_router(directory: str | Path, *, model: nn.Module | None = None, tokenizer=None,
                controller: GatedLora | None = None, embedder: Embedder | None = None) -> Router:
    """Open a router artifact. Routers on base-model embeddings need ``model`` and ``tokenizer``."""
    art = read_artifact(directory)
    if art.kind not in ROUTERS:
        raise RecipeError(f"unknown router kind '{art.kind}'", path=str(directory),
                          fix=f"this loramerge reads: {', '.join(sorted(ROUTERS))}")
    return from_artifact(ROUTERS[art.kind], art, model=model, tokenizer=tokenizer, controller=controller,
                         embedder=embedder)


__all__ = ["ROUTERS", "ROUTER_KINDS", "TRAINABLE_KINDS", "load_router", "router_class", "router_options"]
