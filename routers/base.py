"""The ``Router`` interface every router implements, and how an artifact becomes a router object.

- ``route_weights(prompts) -> Tensor (batch, N)`` weights over ``router.adapter_names``;
  ``route(prompts) -> [{name: weight}]`` the same as one dict per prompt (what ``loramerge.serving`` reads);
- ``predict(prompts)`` the top adapter per prompt; ``compositions(prompts)`` name -> weight dicts;
- ``applied(controller, prompts)``: a context in which a ``GatedLora`` runs each prompt with its mixture
  (context-local: safe with concurrent callers, see ``routers/controller.py``);
- ``save(dir)`` / ``Router.load(dir)``: an artifact holding the adapter names it routes over
  (``loramerge.routers.registry.load_router`` opens any kind).
- ``Options`` + ``from_inputs``: what ``loramerge route train`` may set, declared once per class.

Where to add a router: a module beside the others with a ``Router`` subclass (``kind``, ``route_embeddings``
or ``route_weights``, ``_state`` / ``_from_state``, ``Options`` / ``from_inputs`` to train it from the CLI), then
one line in ``registry.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from loramerge.errors import LoramergeError, RecipeError

from .artifact import RouterArtifact, read_artifact, save_artifact
from .controller import GatedLora
from .embedders import Embedder, build_embedder

if TYPE_CHECKING:
    from .inputs import RouterInputs


class Router:
    """Prompts in, weights over ``adapter_names`` out. Subclasses implement ``route_embeddings``
    (or ``route_weights``) and the artifact hooks ``_state`` / ``_from_state``."""

    kind: ClassVar[str] = ""

    def __init__(self, adapter_names: Sequence[str], embedder: Embedder | None = None, embedder_spec: dict | None = None):
        if not adapter_names:
            raise RecipeError("a router needs at least one adapter name", fix="train it on labelled examples")
        self.adapter_names = list(adapter_names)
        self.embedder = embedder
        self.embedder_spec = dict(embedder.spec) if embedder is not None else dict(embedder_spec or {"kind": "none"})

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.embedder is None:
            raise LoramergeError(
                f"this {self.kind} router has no embedder to read prompts with",
                fix="load it with load_router(dir, model=..., tokenizer=...) (embeddings from the base model; add "
                "controller=attach_twin(...) for a Twin router) or give embedder=...; or call route_embeddings on "
                "precomputed embeddings",
            )
        return self.embedder.embed(prompts)

    def route_weights(self, prompts: Sequence[str]) -> torch.Tensor:
        """(batch, N) weights over ``adapter_names``."""
        return self.route_embeddings(self.embed(prompts))

    def route(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """One ``{adapter name: weight}`` per prompt (non-zero weights only): the form servers consume."""
        return self.compositions(prompts)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(self, prompts: Sequence[str]) -> list[str]:
        return [self.adapter_names[i] for i in self.route_weights(prompts).argmax(-1).tolist()]

    def compositions(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        weights = self.route_weights(prompts)
        return [{n: float(w) for n, w in zip(self.adapter_names, row, strict=True) if float(w) != 0.0}
                for row in weights]

    def accuracy(self, prompts: Sequence[str], labels: Sequence[str]) -> float:
        predicted = self.predict(prompts)
        return sum(p == y for p, y in zip(predicted, labels, strict=True)) / max(len(labels), 1)

    @contextlib.contextmanager
    def applied(self, controller: GatedLora, prompts: Sequence[str]) -> Iterator[torch.Tensor]:
        """Run ``controller``'s model with each prompt's mixture (one row of weights per prompt)."""
        weights = controller.routed(self.route_weights(prompts), self.adapter_names)
        with controller.use_weights(weights):
            yield weights

    # artifact ------------------------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def _from_state(cls, adapter_names: list[str], config: dict, tensors: dict[str, torch.Tensor],
                    embedder: Embedder | None, embedder_spec: dict) -> Router:  # pragma: no cover - interface
        raise NotImplementedError

    # construction -------------------------------------------------------------------------------------------------
    Options: ClassVar[type | None] = None
    """A frozen dataclass of the settings ``loramerge route train`` may set, with their defaults (declared once
    here, used by the class's own signatures); None: the kind is not trained from the command line."""

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: Any) -> Router:
        """Build this router for ``route train`` from the command's inputs and its ``Options`` (kinds that
        declare ``Options`` override this)."""
        raise RecipeError(f"a {cls.kind or cls.__name__} router is not trained by `loramerge route train`",
                          fix="build it in Python (e.g. StaticRouter(names, weights)) and save it")

    @classmethod
    def load(cls, directory: str | Path, *, model: nn.Module | None = None, tokenizer=None,
             controller: GatedLora | None = None, embedder: Embedder | None = None) -> Router:
        """Open an artifact of this kind of router (or of a subclass); ``load_router`` opens any kind."""
        art = read_artifact(directory)
        kinds = {c.kind: c for c in (cls, *_subclasses(cls)) if c.kind}
        if art.kind not in kinds:
            raise RecipeError(f"the artifact holds a {art.kind} router, not a {cls.kind or cls.__name__} one",
                              path=str(directory), fix="load it with load_router (any kind) or the matching class")
        return from_artifact(kinds[art.kind], art, model=model, tokenizer=tokenizer, controller=controller,
                             embedder=embedder)

    def save(self, directory: str | Path, *, force: bool = False) -> Path:
        """Write the router artifact (``router.json`` + ``router.safetensors``) atomically."""
        config, tensors = self._state()
        config = {**config, "embedder": self.embedder_spec}
        return save_artifact(directory, RouterArtifact(self.kind, self.adapter_names, config, tensors), force=force)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def from_artifact(cls: type[Router], art: RouterArtifact, *, model: nn.Module | None = None, tokenizer=None,
                  controller: GatedLora | None = None, embedder: Embedder | None = None) -> Router:
    """Rebuild a router of class ``cls`` from its artifact (the embedder from its spec, bound when it can be)."""
    spec = dict(art.config.get("embedder") or {"kind": "none"})
    if embedder is None:
        embedder = build_embedder(spec, model=model, tokenizer=tokenizer, controller=controller)
    router = cls._from_state(art.adapter_names, art.config, art.tensors, embedder, spec)
    if hasattr(router, "bind") and model is not None and tokenizer is not None and controller is not None:
        router.bind(controller, tokenizer)
    return router


def top_k_softmax(scores: torch.Tensor, top_k: int | None, temperature: float) -> torch.Tensor:
    """Softmax of ``scores / temperature`` over the top-k entries per row (others get weight 0)."""
    if top_k is not None and top_k < scores.shape[-1]:
        top, idx = scores.topk(top_k, dim=-1)
        masked = torch.full_like(scores, float("-inf")).scatter(-1, idx, top)
    else:
        masked = scores
    return torch.softmax(masked / temperature, dim=-1)


__all__ = ["Router", "from_artifact", "top_k_softmax"]
