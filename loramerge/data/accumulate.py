"""What a calibration pass records per batch, and how it adds the adapter to the model (loramerge.data.calibration).

Cost model (SmolLM2-135M, docs/BENCHMARKS.md): the Grams of a decoder layer's four module inputs (attention input,
``o_proj`` input, MLP input, ``down_proj`` input: ``3 x 576^2 + 1536^2`` multiply-adds per token) cost about as
much as the layer's forward (``3.5M`` multiply-adds per token), so they are computed as cheaply as exactness allows:

- only the upper triangle, by row strips (``G[i:j, i:] += X[:, i:j]^T X[:, i:]``): about 0.6x the multiply-adds of
  the full ``X^T X``, accumulated in place (``addmm_``, no temporary); the rest is copied from the transpose once,
  at the end;
- in float32 partial sums that are added into the float64 totals every ``flush_tokens`` tokens (each batch's
  product is a float32 matmul either way; a partial sum of a few batches adds a few float32 roundings, not one
  per token), so the float64 traffic is paid every few batches instead of every batch;
- padding rows are dropped before the product (and nothing is gathered when a batch has no padding).

The adapter's delta is added to the targeted weights for the pass (``W0 + B A``, restored afterwards) instead of
a forward hook per module, so the adapted model costs exactly the plain forward; modules whose weight is shared
(tied embeddings) or not a plain floating tensor keep the hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

STRIP = 384  # row-strip width of the upper-triangle product (measured: 576 -> 2 strips, 1536 -> 4 strips)
FLUSH_TOKENS = 8192  # float32 partial sums go into the float64 totals at least this often (in tokens)


def _strips(d: int, strip: int) -> list[tuple[int, int]]:
    n = max(1, -(-d // strip))
    step = -(-d // n)
    return [(lo, min(lo + step, d)) for lo in range(0, d, step)]


def add_upper_gram(acc: torch.Tensor, rows: torch.Tensor, strip: int = STRIP) -> None:
    """``acc[i:j, i:] += rows[:, i:j]^T rows[:, i:]`` for each row strip ``[i, j)``, in place: the upper triangle and
    the (full, symmetric) diagonal blocks of ``rows^T rows``; below the diagonal blocks nothing is touched."""
    for lo, hi in _strips(rows.shape[1], strip):
        acc[lo:hi, lo:].addmm_(rows[:, lo:hi].T, rows[:, lo:])


def mirror_strips(acc: torch.Tensor, strip: int = STRIP) -> torch.Tensor:
    """Fill what ``add_upper_gram`` leaves out (below the diagonal blocks) from its transpose, in place."""
    for lo, hi in _strips(acc.shape[0], strip):
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


@dataclass
class GramAccumulator:
    """Sums for one pass; ``inputs`` maps each module to the module whose Gram it shares (q/k/v, gate/up).

    ``grams`` (after the pass): the float64 sums ``X^T X`` per input key, symmetric; ``out_sq``: the Fisher output
    factor's sums ``g^2``; ``tokens``: the tokens seen (padding excluded); ``order``: the modules in the order their
    calls arrived while ``recording`` (the first batch: the last one is where a pass may stop).
    """

    modules: Sequence[str]
    fisher: bool
    flush_tokens: int = FLUSH_TOKENS
    strip: int = STRIP
    inputs: dict[str, str] = field(default_factory=dict)
    out_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    order: list[str] = field(default_factory=list)
    recording: bool = True
    mask: torch.Tensor | None = None  # the current batch's flat token mask (None: no padding)
    _partial: dict[str, torch.Tensor] = field(default_factory=dict)
    _total: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending: int = 0  # tokens in the float32 partial sums
    _seen: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return (flat if self.mask is None else flat[self.mask]).float()

    def pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self.recording:
                self.order.append(name)
            owner = self.inputs.get(name)
            if owner is None:  # first batch: the first module to see a tensor owns its Gram
                seen = self._seen.get(id(x))
                if seen is not None and seen[1] is x:
                    self.inputs[name] = seen[0]
                    return None
                self._seen[id(x)] = (name, x)
                self.inputs[name] = owner = name
            if owner != name:
                return None
            rows = self.rows(x)
            acc = self._partial.get(name)
            if acc is None:
                with torch.inference_mode(False):  # a normal tensor, usable after an inference-mode pass
                    acc = self._partial[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32)
            add_upper_gram(acc, rows, self.strip)
            return None
        return hook

    def out_hook(self, name: str):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda g: self._add_out(name, g))
            return None
        return hook

    def _add_out(self, name: str, g: torch.Tensor) -> None:
        sq = self.rows(g).square().sum(0).double()
        self.out_sq[name] = self.out_sq[name] + sq if name in self.out_sq else sq

    def new_batch(self, mask: torch.Tensor) -> None:
        """Call before each batch (``mask``: 1 for tokens, 0 for padding)."""
        if self._pending >= self.flush_tokens:
            self.flush()
        self._seen.clear()
        flat = mask.reshape(-1).bool()
        count = int(flat.sum())
        self.mask = None if count == flat.numel() else flat
        self.tokens += count
        self._pending += count

    def flush(self) -> None:
        """Add the float32 partial sums into the float64 totals and zero them."""
        with torch.inference_mode(False):
            for key, part in self._partial.items():
                total = self._total.get(key)
                if total is None:
                    self._total[key] = part.double()
                else:
                    total.add_(part)
                part.zero_()
        self._pending = 0

    def means(self) -> dict[str, torch.Tensor]:
        """``X^T X / tokens`` per input key, float32, symmetric: what ``calibrate`` stores. Ends the pass (the sums
        are divided in place); when fewer than ``flush_tokens`` tokens were seen, the float32 partial sums are it."""
        out = {}
        for key, part in self._partial.items():
            total = self._total.get(key)
            mean = part.div_(self.tokens) if total is None else total.add_(part).div_(self.tokens).to(torch.float32)
            out[key] = mirror_strips(mean, self.strip)
        self._partial, self._total, self._pending = {}, {}, 0
        return out

    @property
    def grams(self) -> dict[str, torch.Tensor]:
        """The float64 sums ``X^T X`` per input key (symmetric; the accumulator's own tensors, do not modify)."""
        self.flush()
        return {key: mirror_strips(total, self.strip) for key, total in self._total.items()}


def delta_hook(A: torch.Tensor, B: torch.Tensor):
    """A forward hook adding ``x A^T B^T`` to a linear module's output (the LoRA delta, scale folded into B)."""
    def hook(module, args, output):
        return output + (args[0].to(A.dtype) @ A.T) @ B.T
    return hook


def _shared_weights(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {k for k, v in counts.items() if v > 1}


@contextlib.contextmanager
def adapted(model: nn.Module, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """The model with ``W0 + B A`` at each module for the ``with`` block (the original tensors are put back, so the
    base weights are bit-identical afterwards); a forward hook where the weight is shared or not a plain float."""
    shared = _shared_weights(model)
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    handles = []
    try:
        for name, (A, B) in deltas.items():
            module = model.get_submodule(name)
            weight = getattr(module, "weight", None)
            if (type(module) is nn.Linear and isinstance(weight, nn.Parameter) and id(weight) not in shared
                    and weight.dtype.is_floating_point and weight.shape == (B.shape[0], A.shape[1])):
                with torch.no_grad():
                    merged = weight.data + (B.to(torch.float32) @ A.to(torch.float32)).to(weight.dtype)
                swapped.append((weight, weight.data))
                weight.data = merged
            else:
                handles.append(module.register_forward_hook(delta_hook(A, B)))
        yield
    finally:
        for weight, original in swapped:
            weight.data = original
        for h in handles:
            h.remove()


__all__ = ["FLUSH_TOKENS", "GramAccumulator", "adapted", "add_upper_gram", "delta_hook", "mirror_strips"]
