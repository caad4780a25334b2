"""Element-wise merges on delta_W: TIES, DARE, DELLA, Model Breadcrumbs, magnitude pruning.

Each densifies one module at a time, one row block at a time (``ops.BLOCK_ELEMENTS``): for each block, every
adapter's block of ``w_t B_t A_t`` is formed, sparsified and accumulated while it is in cache, then the block
of the result is written. Statistics over a whole task vector (TIES's top-k threshold, Breadcrumbs' band) come
first, from an exact blocked order-statistic pass over the product (``kth_smallest_abs_of_product``). So one
pass over the adapters does what used to take two (the sign election keeps the positive and negative sums and
counts per entry, and picks one of them once the mass is known), and only the result is ever a whole dense
matrix. The non-default TIES options (``merge_func: max``, ``majority_sign: frequency``) keep the two-pass form
below. The result goes back to low rank through the rank policy. User weights multiply the task vectors before
the method sees them (``tau_t = w_t * B_t A_t``), so with unit weights each
function is the paper's algorithm on that module.

On the CPU the work is shared among torch's intra-op threads (``core/threads.py``), each task on one thread: the
per-adapter order statistics run for several adapters at once, and per block the adapters are sparsified at
once, then the block is fused in one piece per thread. Every entry's arithmetic (and every adapter's random
stream) is the same whatever the thread count, so the result is too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from pydantic import Field, model_validator

from loramerge.core.ops import (
    BLOCK_ELEMENTS,
    chunked_drop,
    elect_sign_int8,
    flat_chunks,
    generator_for,
    keep_band,
    kth_smallest_abs_of_product,
    magprune_keep_probs,
    random_drop_,
    replay_drop_,
    row_blocks,
    shrink_below,
    topk_threshold,
    topk_threshold_of_product,
    zero_below_,
)
from loramerge.core.streams import UniformStream
from loramerge.core.threads import cpu_workers, parallel_map, scratch, split_range
from loramerge.merging.methods.base import Dense, MethodConfig, ModuleInputs

T = TypeVar("T")
Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""(adapter position, weighted dense delta) -> the sparsified, possibly rescaled delta."""


def _dense(inputs: ModuleInputs, t: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w_t * (B_t @ A_t)``, written into ``out`` when it fits (a buffer reused across adapters)."""
    f = inputs.factors[t]
    shape = (f.B.shape[0], f.A.shape[1])
    if out is None or out.shape != shape or out.dtype != f.B.dtype or out.device != f.B.device:
        out = torch.empty(shape, dtype=f.B.dtype, device=f.B.device)
    torch.matmul(f.B, f.A, out=out)
    return out.mul_(inputs.weights[t])


def _sign_resolved_merge(
    inputs: ModuleInputs, sparsify: Sparsifier, merge_func: str, majority_sign: str,
    denominator: Literal["count", "weight"] = "count",
) -> torch.Tensor:
    """Elect a sign per entry from the sparsified task vectors, then merge the agreeing entries.

    Two passes over the adapters (the sparsifier must be deterministic): the
    first accumulates the mass for the election, the second the agreeing values.
    The elected sign is kept as int8 (+1/-1) and agreement counts as small
    integers, so the second pass holds about 2.5 dense deltas.
    """
    buf, mass = None, None
    for t in range(len(inputs.factors)):
        buf = _dense(inputs, t, buf)
        d = sparsify(t, buf)
        if mass is None:
            mass = torch.sign(d) if majority_sign == "frequency" else d.clone()
        elif majority_sign == "frequency":
            for m, x in flat_chunks(mass, d.contiguous()):
                m.add_(torch.sign(x))
        else:
            mass.add_(d)
    buf = d = None  # not needed during the election; the second pass takes a fresh buffer
    sign = elect_sign_int8(mass)
    acc = mass.zero_()  # the mass's memory becomes the accumulator
    by_weight = denominator == "weight"
    count_dtype = torch.uint8 if len(inputs.factors) < 256 else torch.int32
    norm = torch.zeros_like(acc) if by_weight else torch.zeros(acc.shape, dtype=count_dtype, device=acc.device)
    for t in range(len(inputs.factors)):
        buf = _dense(inputs, t, buf)
        d = sparsify(t, buf).contiguous()
        weight = abs(inputs.weights[t])
        for a, n, x, s in flat_chunks(acc, norm, d, sign):
            agree = (x * s) > 0  # x != 0 and has the elected sign (x * +-1 is exact)
            if merge_func == "max":
                a.copy_(torch.where(agree & (x.abs() > a.abs()), x, a))
                continue
            a.add_(x * agree)  # x where it agrees, +-0.0 elsewhere: the same sums as where(agree, x, 0.0)
            if by_weight:
                n.add_(agree.to(n.dtype) * weight)
            else:
                n.add_(agree)
    if merge_func == "mean":
        for a, n in flat_chunks(acc, norm):
            a.div_(n.clamp(min=1e-12) if by_weight else n.clamp(min=1).to(a.dtype))
    return acc


BlockSparsifier = Callable[[int, torch.Tensor, slice], torch.Tensor]
"""(adapter position, a row block of w_t B_t A_t, its rows) -> the sparsified block (in place allowed)."""


class _Blocks:
    """Row blocks of each adapter's weighted product ``w_t B_t A_t``, each adapter's formed into its own reused
    buffer (so that the adapters of a block can be worked on at once)."""

    def __init__(self, inputs: ModuleInputs) -> None:
        f0 = inputs.factors[0]
        self.n = len(inputs.factors)
        self.shape = (f0.B.shape[0], f0.A.shape[1])
        self.dtype = f0.B.dtype
        self.device = f0.B.device
        self.B = [f.B * w for f, w in inputs.weighted()]  # d_out x r: weights folded in (small)
        self.A = [f.A for f in inputs.factors]
        self.rows = row_blocks(*self.shape)
        self.workers = cpu_workers(self.device)
        self._bufs: dict[int, torch.Tensor] = {}

    def block(self, t: int, rows: slice) -> torch.Tensor:
        if t not in self._bufs:
            self._bufs[t] = torch.empty(BLOCK_ELEMENTS + self.shape[1], dtype=self.dtype, device=self.device)
        out = self._bufs[t][: (rows.stop - rows.start) * self.shape[1]].view(rows.stop - rows.start, self.shape[1])
        return torch.matmul(self.B[t][rows], self.A[t], out=out)

    def sparsified(self, sparsify: BlockSparsifier, rows: slice) -> list[torch.Tensor]:
        """Every adapter's sparsified block of these rows, flattened, the adapters shared among the workers.
        Each adapter's blocks are still sparsified one after another in row order (its random stream, if any,
        is drawn in memory order)."""
        return parallel_map(lambda t: sparsify(t, self.block(t, rows), rows).reshape(-1), range(self.n), self.workers)

    def pieces(self, rows: slice) -> list[slice]:
        """The flat entries of a row block, in one contiguous piece per worker (pieces of at least 32 Ki entries:
        smaller ones would cost more in Python than in arithmetic on machines with many cores)."""
        n = (rows.stop - rows.start) * self.shape[1]
        return split_range(n, min(self.workers, max(1, n >> 15)))


def row_basis(inputs: ModuleInputs) -> torch.Tensor:
    """An orthonormal basis of the inputs' stacked A rows (d_in x R): the warm start of the rank policy's SVD."""
    A_cat = torch.cat([f.A for f in inputs.factors], dim=0)
    return torch.linalg.qr(A_cat.T, mode="reduced")[0]


def per_adapter(fn: Callable[[torch.Tensor, torch.Tensor], T], inputs: ModuleInputs) -> list[T]:
    """``[fn(w_t B_t, A_t) for each adapter]``, the adapters shared among the CPU workers."""
    pairs = [(f.B * w, f.A) for f, w in inputs.weighted()]
    return parallel_map(lambda pair: fn(*pair), pairs, cpu_workers(inputs.factors[0].B.device))


def _blocked_sum(inputs: ModuleInputs, sparsify: BlockSparsifier, scale: float) -> torch.Tensor:
    """``scale * sum_t sparsify(w_t B_t A_t)``, block by block (adapters summed in order, as a dense loop would)."""
    blocks = _Blocks(inputs)
    out = torch.empty(blocks.shape, dtype=blocks.dtype, device=blocks.device)
    for rows in blocks.rows:
        ds = blocks.sparsified(sparsify, rows)
        target = out[rows].view(-1)

        def add(piece: slice, ds: list[torch.Tensor] = ds, target: torch.Tensor = target) -> None:
            acc = target[piece]
            acc.copy_(ds[0][piece])
            for d in ds[1:]:
                acc.add_(d[piece])
            acc.mul_(scale)

        parallel_map(add, blocks.pieces(rows), blocks.workers)
    return out


def _blocked_sign_resolved(
    inputs: ModuleInputs, sparsify: BlockSparsifier, merge_func: Literal["mean", "sum"], scale: float,
    denominator: Literal["count", "weight"] = "count",
) -> torch.Tensor:
    """TIES's elect-and-fuse with the mass rule, in one pass over the adapters.

    Per block it keeps the mass ``sum_t d_t`` (in the adapters' order, so the elected signs are those of the
    two-pass form), the sum of the positive entries, and per entry the sum of ``sign(d_t)`` and of ``|sign(d_t)|``
    (weighted by ``|w_t|`` for DELLA's weight denominator), from which the positive and negative counts follow.
    Where the mass is positive the result is the positive sum over its count, where negative the negative sum
    (mass minus positive sum) over its count: exactly the disjoint mean (or sum) of the entries that agree with
    the elected sign. Only float operations run per adapter and entry (boolean comparisons are several times
    slower on CPU). Entries whose mass is exactly zero while some entry is not (an exact cancellation) take the
    sign of the whole mass's sum, known only at the end: they are recorded and filled in then. The adapters of a
    block are sparsified by the workers at once, then each worker fuses its piece of the block (every entry's
    arithmetic is the same whatever the number of workers).
    """
    blocks = _Blocks(inputs)
    out = torch.empty(blocks.shape, dtype=blocks.dtype, device=blocks.device)
    flat_out = out.view(-1)
    by_weight = denominator == "weight"
    alphas = [abs(w) if by_weight else 1.0 for w in inputs.weights]
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    total = 0.0

    def fuse(ds: list[torch.Tensor], piece: slice, target: torch.Tensor) -> tuple[float, tuple | None]:
        size = piece.stop - piece.start
        mass, pos, signs, nonzero = (torch.empty(size, dtype=blocks.dtype, device=blocks.device) for _ in range(4))
        for t, block in enumerate(ds):
            d, alpha = block[piece], alphas[t]
            s = torch.sign(d)
            if t == 0:
                mass.copy_(d)
                torch.clamp(d, min=0.0, out=pos)
                torch.mul(s, alpha, out=signs)
                torch.abs(s, out=nonzero).mul_(alpha)
                continue
            mass.add_(d)
            pos.add_(d.clamp(min=0.0))
            signs.add_(s, alpha=alpha)
            nonzero.addcmul_(s, s, value=alpha)  # |s| = s * s: one pass instead of abs and add
        mass_sum = float(mass.sum(dtype=torch.float64))
        elected = torch.sign(mass)
        tied = (1.0 - elected.abs()).mul_(nonzero)  # > 0 where the mass is 0 but some entry is not
        neg = mass.sub_(pos)
        if merge_func == "mean":
            floor = 1e-12 if by_weight else 1.0
            n_pos = (nonzero + signs).mul_(0.5)  # integer counts (or summed |w_t|) of the positive entries
            n_neg = nonzero.sub_(signs).mul_(0.5)
            pos.div_(n_pos.clamp_(min=floor))
            neg.div_(n_neg.clamp_(min=floor))
        positive = elected.clamp(min=0.0)  # 1 where the mass is positive
        negative = elected.abs_().sub_(positive)  # 1 where it is negative
        torch.mul(pos, positive, out=target).add_(neg * negative).mul_(scale)
        if float(tied.sum()) > 0:  # tied >= 0; a sum is far cheaper than any() on CPU
            mask = tied.bool()
            return mass_sum, (target, mask, pos[mask].clone(), neg[mask].clone())
        return mass_sum, None

    for rows in blocks.rows:
        ds = blocks.sparsified(sparsify, rows)
        offset = rows.start * blocks.shape[1]
        pieces = blocks.pieces(rows)
        fused = parallel_map(lambda p, ds=ds, offset=offset: fuse(ds, p, flat_out[offset + p.start:offset + p.stop]),
                             pieces, blocks.workers)
        for mass_sum, tie in fused:
            total += mass_sum
            if tie is not None:
                pending.append(tie)
    for target, tied, pos_values, neg_values in pending:
        target[tied] = scale * (pos_values if total >= 0 else neg_values)
    return out


class TiesConfig(MethodConfig):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept by magnitude (paper k=20%)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")
    merge_func: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean (paper), sum or max")
    majority_sign: Literal["total", "frequency"] = Field("total", description="'total' mass (paper) or a count vote")


def ties(cfg: TiesConfig, inputs: ModuleInputs) -> Dense:
    """TIES: trim each task vector to its top-k magnitudes, elect signs by mass, disjoint mean."""
    if cfg.majority_sign == "total" and cfg.merge_func != "max":
        thresholds = per_adapter(lambda B, A: topk_threshold_of_product(B, A, cfg.density), inputs)

        def trim_block(t: int, d: torch.Tensor, rows: slice) -> torch.Tensor:
            return d if thresholds[t] is None else shrink_below(d, thresholds[t])

        return Dense(_blocked_sign_resolved(inputs, trim_block, cfg.merge_func, cfg.lambda_), basis=row_basis(inputs))
    thresholds: dict[int, float | None] = {}

    def trim(t: int, d: torch.Tensor) -> torch.Tensor:
        if t not in thresholds:
            thresholds[t] = topk_threshold(d, cfg.density)
        thr = thresholds[t]
        return d if thr is None else zero_below_(d, thr)

    merged = _sign_resolved_merge(inputs, trim, cfg.merge_func, cfg.majority_sign)
    return Dense(merged.mul_(cfg.lambda_))


class DareConfig(MethodConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="keep probability (1 - drop rate p)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")
    rescale: bool = Field(True, description="divide survivors by the density (unbiased, as in the paper)")


class DareTiesConfig(DareConfig):
    majority_sign: Literal["total", "frequency"] = "total"


def _dare_blocks(cfg: DareConfig, inputs: ModuleInputs) -> BlockSparsifier:
    """The seeded random drop, block after block: each adapter's generator is drawn from in memory order, so
    the mask is the one a single draw over the whole matrix gives (``random_drop_``'s stream)."""
    device = inputs.factors[0].B.device
    gens = [generator_for(inputs.seed, "dare", inputs.name, name, device=device) for name in inputs.adapter_names]

    def drop(t: int, d: torch.Tensor, rows: slice) -> torch.Tensor:
        return d if cfg.density >= 1.0 else random_drop_(d, cfg.density, gens[t], cfg.rescale)

    return drop


def _dare(cfg: DareConfig, inputs: ModuleInputs, *, keep_masks: bool = False) -> Sparsifier:
    """The seeded random drop on a whole dense delta (the two-pass form). With ``keep_masks``, each adapter's
    mask is kept bit-packed after its first use and replayed on the second: the same mask, not drawn again."""
    masks: dict[int, torch.Tensor] = {}

    def drop(t: int, d: torch.Tensor) -> torch.Tensor:
        if cfg.density >= 1.0:
            return d
        if t in masks:
            return replay_drop_(d, masks[t], cfg.density, cfg.rescale)
        gen = generator_for(inputs.seed, "dare", inputs.name, inputs.adapter_names[t], device=d.device)
        if not (keep_masks and chunked_drop(d)):
            return random_drop_(d, cfg.density, gen, cfg.rescale)
        masks[t] = torch.empty((d.numel() + 7) // 8, dtype=torch.uint8)
        return random_drop_(d, cfg.density, gen, cfg.rescale, record=masks[t])

    return drop


def dare_linear(cfg: DareConfig, inputs: ModuleInputs) -> Dense:
    """DARE: drop entries at random (keep prob. density), rescale, then weighted sum."""
    return Dense(_blocked_sum(inputs, _dare_blocks(cfg, inputs), cfg.lambda_), basis=row_basis(inputs))


def dare_ties(cfg: DareTiesConfig, inputs: ModuleInputs) -> Dense:
    """DARE's random drop followed by TIES sign election and disjoint mean."""
    if cfg.majority_sign == "total":
        return Dense(_blocked_sign_resolved(inputs, _dare_blocks(cfg, inputs), "mean", cfg.lambda_), basis=row_basis(inputs))
    drop = _dare(cfg, inputs, keep_masks=True)
    return Dense(_sign_resolved_merge(inputs, drop, "mean", cfg.majority_sign).mul_(cfg.lambda_))


class DellaConfig(MethodConfig):
    density: float = Field(0.7, gt=0.0, le=1.0, description="mean keep probability d (official example: drop 0.3)")
    epsilon: float = Field(0.07, ge=0.0, description="half-width of the keep-probability window (window 0.14)")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector (official example 1.1)")
    elect_sign: bool = Field(True, description="TIES-style elect and fuse; false gives della_linear")

    @model_validator(mode="after")
    def _window_inside_unit_interval(self) -> DellaConfig:
        if self.density - self.epsilon <= 0.0 or self.density + self.epsilon > 1.0:
            raise ValueError("density - epsilon must be > 0 and density + epsilon <= 1")
        return self


def della(cfg: DellaConfig, inputs: ModuleInputs) -> Dense:
    """DELLA (MAGPRUNE): magnitude-ranked keep probabilities per row, 1/p rescale, elect, weighted fuse."""
    streams = [UniformStream.for_parts(inputs.seed, "della", inputs.name, name) for name in inputs.adapter_names]

    def magprune(t: int, d: torch.Tensor, rows: slice) -> torch.Tensor:
        shape = tuple(d.shape)
        # per row: a block of rows is enough
        probs = magprune_keep_probs(d, cfg.density, cfg.epsilon, out=scratch("della_p", shape, d.dtype, d.device))
        # Bernoulli(p) draws as u < p, u from the adapter's stream in memory order (torch.rand's float32 grid, from
        # a faster generator than torch's: the stream is not torch.bernoulli's), with float operations:
        # probs - u > 0 exactly when u < probs; d * 1 / p where kept, +-0 where dropped
        u = streams[t].fill_(scratch("della_u", shape, d.dtype, d.device))
        keep = torch.sub(probs, u, out=u).sign_().clamp_(min=0.0)
        return d.mul_(keep).div_(probs)

    if not cfg.elect_sign:
        return Dense(_blocked_sum(inputs, magprune, cfg.lambda_), basis=row_basis(inputs))
    return Dense(_blocked_sign_resolved(inputs, magprune, "mean", cfg.lambda_, denominator="weight"), basis=row_basis(inputs))


class BreadcrumbsConfig(MethodConfig):
    density: float = Field(0.1, gt=0.0, le=1.0, description="fraction kept (the band below the outliers)")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest-magnitude outliers removed")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector (paper ~0.3 for 8 tasks)")
    sign_election: bool = Field(False, description="TIES sign election on the masked vectors (breadcrumbs_ties)")

    @model_validator(mode="after")
    def _band_fits(self) -> BreadcrumbsConfig:
        if self.density + self.gamma > 1.0:
            raise ValueError("density + gamma must be <= 1")
        return self


def breadcrumbs(cfg: BreadcrumbsConfig, inputs: ModuleInputs) -> Dense:
    """Model Breadcrumbs: mask out outliers and small entries per task, then sum."""
    f0 = inputs.factors[0]
    n = f0.d_out * f0.d_in
    n_top, n_keep = int(cfg.gamma * n), int(cfg.density * n)
    lowest = n - n_top - n_keep + 1  # ascending rank of the smallest entry kept (as ``ops.band_mask``)

    def band_of(B: torch.Tensor, A: torch.Tensor) -> tuple[float, float] | None:
        if n_keep <= 0 or n_top >= n:
            return None
        ranks = [n - n_top] + ([lowest] if lowest > 1 else [])
        values = kth_smallest_abs_of_product(B, A, ranks)
        return (values[1] if lowest > 1 else 0.0, values[0])

    bands = per_adapter(band_of, inputs)

    def band(t: int, d: torch.Tensor, rows: slice) -> torch.Tensor:
        if bands[t] is None:
            return d.zero_()
        return keep_band(d, *bands[t])

    if cfg.sign_election:
        return Dense(_blocked_sign_resolved(inputs, band, "mean", cfg.lambda_), basis=row_basis(inputs))
    return Dense(_blocked_sum(inputs, band, cfg.lambda_), basis=row_basis(inputs))


class MagnitudePruneConfig(MethodConfig):
    density: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each task vector kept by magnitude")
    lambda_: float = Field(1.0, alias="lambda", description="scale on the merged vector")


def magnitude_prune(cfg: MagnitudePruneConfig, inputs: ModuleInputs) -> Dense:
    """Keep each task vector's largest entries, then weighted sum."""
    thresholds = per_adapter(lambda B, A: topk_threshold_of_product(B, A, cfg.density), inputs)

    def prune(t: int, d: torch.Tensor, rows: slice) -> torch.Tensor:
        return d if thresholds[t] is None else shrink_below(d, thresholds[t])

    return Dense(_blocked_sum(inputs, prune, cfg.lambda_), basis=row_basis(inputs))
