"""What ``loramerge route train`` hands a router class to build itself: adapters, data, base model, embedder.

Everything is loaded lazily and once (the base model, the examples), so a router that needs no model
(Arrow) never loads one, and every router reports missing inputs with the flag that supplies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from loramerge.core.names import parse_pairs
from loramerge.errors import RecipeError

from .controller import GatedLora
from .data import lm_examples, task_examples
from .embedders import Embedder, MiniLMEmbedder, PooledHiddenEmbedder

EMBEDDERS = ("base", "minilm")


def parse_adapters(items: list[str]) -> tuple[list[str], list[str]]:
    """``name=path`` or ``path`` (named after its directory) -> (names, paths), through the one name parser."""
    pairs = parse_pairs(items, option="adapter", name_optional=True)
    return list(pairs), list(pairs.values())


def load_base(path: Path | None, *, needed_for: str) -> tuple[nn.Module, Any]:
    """A local transformers causal LM and its tokenizer, in eval mode."""
    if path is None:
        raise RecipeError(f"{needed_for} needs the base model", fix="pass --base-model DIR (a transformers model "
                          "directory with its tokenizer)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    except (OSError, ValueError) as exc:
        raise RecipeError(f"could not load the base model: {exc}", path=str(path),
                          fix="give a local transformers model directory that holds a tokenizer too") from exc
    return model, tokenizer


def attach(model: nn.Module, names: list[str], paths: list[str], twin: Path | None, core: bool = False) -> GatedLora:
    """The adapters (or a Twin bundle) attached to ``model`` as one gated LoRA (core-space layers with ``core``)."""
    from .gated import attach_gated_lora, attach_twin

    if twin is not None:
        if core:
            raise RecipeError("core-space gates over a twin bundle are not supported", fix="use --space gated")
        return attach_twin(model, twin)
    if not paths:
        raise RecipeError("this router needs the adapters", fix="list the adapters (name=path) to route over")
    if core:
        from .core_space import attach_core_space

        return attach_core_space(model, paths, names=names)
    return attach_gated_lora(model, paths, names=names)


@dataclass
class RouterInputs:
    """The inputs of ``route train``; router classes take what they need (``Router.from_inputs``)."""

    adapter_items: list[str]
    data: Any = None
    """``--data``: a file, ``name=file`` items (a file per adapter), or anything the data reader takes."""
    base_model: Path | None = None
    embedder: str = "base"
    layer: int = -1
    twin: Path | None = None
    seed: int = 0
    _base: tuple[nn.Module, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.twin is not None and self.adapter_items:
            raise RecipeError("give adapters or --twin, not both", fix="a twin bundle brings its own task adapters")
        if self.embedder not in EMBEDDERS:
            raise RecipeError(f"unknown embedder '{self.embedder}'", fix="use 'base' or 'minilm'")
        self.names, self.paths = parse_adapters(self.adapter_items)

    def adapters(self, needed_for: str) -> tuple[list[str], list[str]]:
        if not self.paths:
            raise RecipeError(f"{needed_for} needs the adapters", fix="list the adapters to route over")
        return self.names, self.paths

    def base(self, needed_for: str) -> tuple[nn.Module, Any]:
        """The base model and tokenizer (loaded on first use)."""
        if self._base is None:
            self._base = load_base(self.base_model, needed_for=needed_for)
        return self._base

    def controller(self, model: nn.Module, *, core: bool = False) -> GatedLora:
        return attach(model, self.names, self.paths, self.twin, core=core)

    def _data(self, kind: str) -> Any:
        if self.data is None:
            raise RecipeError(f"a {kind} router learns from data", fix="pass --data FILE.jsonl")
        return self.data

    def examples(self, kind: str) -> tuple[list[str], list[str]]:
        """Texts and their task labels from ``--data``."""
        return task_examples(self._data(kind))

    def pairs(self) -> list[Any]:
        """LoraHub's few examples of the new task from ``--data``."""
        return lm_examples(self._data("lorahub"))

    def features(self) -> tuple[Embedder, list[str] | None]:
        """The embedder for centroid / knn / classifier routers and the adapter names they route over."""
        route_names = self.names or None
        if self.embedder == "minilm":
            features: Embedder = MiniLMEmbedder()
        else:
            model, tokenizer = self.base("base-model embeddings")
            controller = self.controller(model) if self.twin is not None else None
            features = PooledHiddenEmbedder(model, tokenizer, layer=self.layer, controller=controller,
                                            gate_weights={"shared": 1.0} if self.twin is not None else None)
            if controller is not None:
                route_names = [n for n in controller.adapter_names if n != "shared"]
        if self.twin is not None and route_names is None:
            from loramerge.artifacts.twin import load_twin

            route_names = load_twin(self.twin).task_names
        return features, route_names


__all__ = ["RouterInputs", "attach", "load_base", "parse_adapters"]
