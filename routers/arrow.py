"""Arrow (Ostapenko et al., ICML 2024; PEFT's ``ArrowConfig``): data-free routing from the adapters' weights.

Each adapter's top right singular vector per module (factored power iteration on ``A^T (B^T B) A``);
per-token top-k routing with temperature (as PEFT's arrow), or per request by averaging the token coefficients.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loramerge.core.adapter_set import AdapterSet
from loramerge.errors import LoramergeError, RecipeError

from .base import Router, top_k_softmax
from .controller import AdapterLike, GatedLora
from .layers import GateModule
from .lm_loss import ensure_pad_token, tokenize

if TYPE_CHECKING:
    from .inputs import RouterInputs

_CAPTURING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loramerge_arrow_capture", default=None)


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
        return top_k_softmax(scores, min(self.top_k, scores.shape[-1]), self.temperature)

    def forward(self, x: torch.Tensor, z: torch.Tensor, layer) -> torch.Tensor:
        coeff = self.coefficients(x)
        out = self.passthrough.to(coeff.dtype).expand(*coeff.shape[:-1], self.num_adapters)
        return out.index_copy(-1, self.present_index, coeff)


@dataclass(frozen=True)
class ArrowOptions:
    top_k: int = 3
    temperature: float = 1.0
    mode: str = "token"
    """Route per ``"token"`` (gates in every layer) or per ``"request"`` (token coefficients averaged)."""


class ArrowRouter(Router):
    """Arrow (Ostapenko et al., ICML 2024; PEFT's ``ArrowConfig``): zero-shot routing from the adapters' weights.

    ``gates()`` gives per-token, per-layer gate modules (``controller.set_gates``); ``route_weights`` (after
    ``bind(controller, tokenizer)``) averages those coefficients over a prompt's tokens and the layers
    (inputs from one base-model forward) for per-request routing. ``mode`` picks what ``applied`` does.
    """

    kind = "arrow"
    Options = ArrowOptions

    def __init__(self, adapter_names, prototypes: dict[str, torch.Tensor], present: dict[str, list[int]], *,
                 top_k: int = ArrowOptions.top_k, temperature: float = ArrowOptions.temperature, normalize: bool = False,
                 mode: str = ArrowOptions.mode,
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
    def from_adapters(cls, adapters: Sequence[AdapterLike], *, names: Sequence[str] | None = None,
                      top_k: int = ArrowOptions.top_k, temperature: float = ArrowOptions.temperature, iters: int = 15,
                      seed: int = 0, normalize: bool = False, method: str = "power",
                      mode: str = ArrowOptions.mode) -> ArrowRouter:
        """Prototypes per module: power iteration (``method="power"``, PEFT's 15 steps) or the exact
        factored SVD (``"svd"``: QR + small SVD, same vector up to sign)."""
        if method not in ("power", "svd"):
            raise RecipeError(f"unknown prototype method '{method}'", fix="use 'power' or 'svd'")
        aset = AdapterSet.open(adapters, names=names)
        loaded = list(aset)
        prototypes, present = {}, {}
        for module in aset.module_names:
            idx = list(aset.present(module))
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

    @classmethod
    def from_inputs(cls, inputs: RouterInputs, options: ArrowOptions) -> ArrowRouter:
        """Data-free: built from the adapters' weights alone."""
        names, paths = inputs.adapters("Arrow")
        return cls.from_adapters(paths, names=names, top_k=options.top_k, temperature=options.temperature,
                                 seed=inputs.seed, mode=options.mode)

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
        batch = tokenize(self.tokenizer, list(prompts), padding=True, padding_side="right", return_tensors="pt")
        device = next(controller.model.parameters()).device
        token = _CAPTURING.set(captured)
        try:
            with controller.detached():
                controller.model(**batch.to(device))
        finally:
            _CAPTURING.reset(token)
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
        weights = controller.routed(torch.ones(1, self.num_adapters), self.adapter_names)
        with controller.use_gates(self.gates(controller)), controller.use_weights(weights):
            yield None

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
    """A pre-hook that records the module's input, for the forward passes of the context that set ``store``."""
    def hook(module, args):
        if _CAPTURING.get() is store:
            store[name] = args[0].detach()
    return hook


__all__ = ["ArrowGate", "ArrowOptions", "ArrowRouter", "top_right_singular_vector"]
