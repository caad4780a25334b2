"""Seeded uniform random numbers for the element-wise methods, several times cheaper than torch's CPU generator.

torch's CPU generator is a Mersenne Twister drawn one number at a time (about 4-6 ns per number on the benchmark
machine); numpy's SFC64 gives a 64-bit word in about 2 ns, that is two uniforms. ``UniformStream`` turns each
32-bit half into ``(bits >> 8) / 2**24``: exactly the grid and the distribution of ``torch.rand`` in float32
(24 random bits, values k / 2**24 in [0, 1)), so ``u < p`` keeps an entry with probability p (to 2**-24), as
``torch.bernoulli(p)`` does. The numbers differ from torch's stream; they depend only on the seed and on how many
have been drawn before, not on how the draws are split.
"""

from __future__ import annotations

import numpy as np
import torch

from loramerge.core.ops import derive_seed

_SCALE = 2.0 ** -24


class UniformStream:
    """One seeded stream of uniforms in [0, 1): draws continue where the last one ended (an unused 32-bit half
    of a word is kept for the next draw), so a matrix drawn block by block gets the numbers drawn whole."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.SFC64(seed)
        self._spare: np.ndarray | None = None  # one 32-bit half left from the last word, if any

    @classmethod
    def for_parts(cls, seed: int, *parts: object) -> UniformStream:
        """The stream of (seed, method, module, adapter, ...): ``ops.derive_seed``'s seed, order-independent."""
        return cls(derive_seed(seed, *parts))

    def _halves(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit numbers (uint32)."""
        spare, self._spare = self._spare, None
        need = n - (0 if spare is None else 1)
        halves = self._bits.random_raw((need + 1) // 2).view(np.uint32)  # little-endian: low half first
        if halves.size > need:
            self._spare = halves[need:].copy()
            halves = halves[:need]
        return halves if spare is None else np.concatenate([spare, halves])

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (float32 or float64, any device) with the next ``out.numel()`` uniforms, in memory order."""
        ints = np.right_shift(self._halves(out.numel()), 8)  # 24 random bits each
        on_cpu = out.device.type == "cpu" and out.is_contiguous()
        target = out if on_cpu else torch.empty(out.shape, dtype=out.dtype)
        flat = target.numpy().reshape(-1)
        # k * 2**-24 is exact in float32 (k < 2**24): the same values as torch.rand's
        np.multiply(ints, _SCALE, out=flat, dtype=flat.dtype, casting="unsafe")
        return out if on_cpu else out.copy_(target)
