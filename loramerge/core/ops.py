"""Small pure functions over dense tensors, used by the element-wise merge methods.

All masks are boolean tensors of the input's shape; ``density`` is always the
fraction of entries KEPT (PEFT's and mergekit's convention).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from loramerge.core.threads import scratch

CHUNK_ELEMENTS = 1 << 18
"""Entries per chunk in the element-wise passes (1 MiB of float32). Working chunk by chunk keeps each step's
temporaries in cache and lets the allocator reuse them, instead of page-faulting a fresh module-sized tensor
per operation (which dominated the time of the element-wise merges on CPU)."""

_SAMPLE = 1 << 16


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for (seed, module, adapter, ...), independent of iteration order."""
    text = "\x1f".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


def topk_threshold(x: torch.Tensor, density: float) -> float | None:
    """The smallest |x| kept when keeping the top ``density`` fraction; None means keep all."""
    n = x.numel()
    k = int(density * n)
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    return float(kth_smallest_abs(x, n - k + 1))


def kth_smallest_abs(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Exactly ``torch.kthvalue(x.abs().reshape(-1), rank).values``, without copying or sorting all of ``x``.

    Two order statistics of a fixed random sample bracket the answer; one chunked pass counts the entries
    below the bracket and keeps those inside it (a few percent), and kthvalue runs on those. If the bracket
    misses (a pathological sample), it falls back to kthvalue over everything: the value is the same either way.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(flat.abs(), rank).values
    picks = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(flat.device)
    sample = flat[picks].abs()
    centre = rank * _SAMPLE / n
    margin = 4.0 * math.sqrt(_SAMPLE) + 8.0
    lo = torch.kthvalue(sample, max(1, int(centre - margin))).values
    hi = torch.kthvalue(sample, min(_SAMPLE, int(centre + margin) + 1)).values
    below = 0
    inside = []
    for chunk in flat.split(CHUNK_ELEMENTS):
        a = chunk.abs()
        below += int(torch.count_nonzero(a < lo))
        inside.append(a[(a >= lo) & (a <= hi)])
    candidates = torch.cat(inside)
    if below < rank <= below + candidates.numel():
        return torch.kthvalue(candidates, rank - below).values
    return torch.kthvalue(flat.abs(), rank).values


def flat_chunks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching views of equally shaped contiguous tensors, CHUNK_ELEMENTS entries at a time, in memory order."""
    flats = [t.view(-1) for t in tensors]
    for start in range(0, flats[0].numel(), CHUNK_ELEMENTS):
        yield tuple(f[start:start + CHUNK_ELEMENTS] for f in flats)


def zero_below_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: ``x[|x| < threshold] = 0`` (TIES trim, magnitude prune), chunk by chunk.

    Uses ``hardshrink`` (zero where ``|x| <= lambd``, one vectorised pass; masked_fill_ is several times slower
    on CPU) with ``lambd`` the next float below ``threshold``, so that exactly the entries with ``|x| < threshold``
    become (+0.0) zeros.
    """
    if not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64) or not threshold > 0:
        return x.masked_fill_(x.abs() < threshold, 0.0)
    below = torch.nextafter(torch.tensor(threshold, dtype=x.dtype), torch.tensor(-math.inf, dtype=x.dtype))
    lambd = float(below)
    for (chunk,) in flat_chunks(x):
        chunk.copy_(torch.nn.functional.hardshrink(chunk, lambd))
    return x


def shrink_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries of ``|x| < threshold`` zeroed, as a new tensor (one vectorised ``hardshrink``;
    ``zero_below_``'s rule, without writing back into ``x``)."""
    if not threshold > 0:
        return x
    if math.isinf(threshold) or x.dtype not in (torch.float32, torch.float64):
        return x.masked_fill(x.abs() < threshold, 0.0)
    below = torch.nextafter(torch.tensor(threshold, dtype=x.dtype), torch.tensor(-math.inf, dtype=x.dtype))
    return torch.nn.functional.hardshrink(x, float(below))


def chunked_drop(x: torch.Tensor) -> bool:
    """Whether ``random_drop_`` draws ``x``'s mask chunk by chunk (and can record it): contiguous CPU tensors."""
    return x.device.type == "cpu" and x.is_contiguous()


def random_drop_(
    x: torch.Tensor, density: float, generator: torch.Generator, rescale: bool, record: torch.Tensor | None = None
) -> torch.Tensor:
    """In place DARE: zero each entry with probability ``1 - density`` (then divide by ``density`` if ``rescale``).

    Draws exactly the mask ``bernoulli_mask(x.shape, density, generator)`` would: on CPU the Bernoulli draws are
    serial in memory order, so drawing chunk after chunk from one generator gives the same stream, and
    ``torch.bernoulli`` with a float32 probability keeps an entry when the float32 uniform drawn from the same
    32-bit random number is below it, which is ``torch.rand(...) < density`` (about 3.5x faster). Dropped
    entries are multiplied by 0.0 (much faster than masked_fill_), so a dropped negative entry reads -0.0,
    which equals 0.0 in every comparison and sum. ``record`` (only where ``chunked_drop(x)``), a uint8 tensor of
    ``ceil(numel / 8)`` bytes, receives the mask bit-packed (1/32 of a float32 delta), so that ``replay_drop_``
    can apply it again without drawing it again.
    """
    if not chunked_drop(x):
        if record is not None:
            raise ValueError("a DARE mask can be recorded only for a contiguous CPU tensor")
        x.masked_fill_(~bernoulli_mask(x.shape, density, generator, device=x.device), 0.0)
        return x.div_(density) if rescale else x
    for i, (chunk,) in enumerate(flat_chunks(x)):
        # keep = (u < density) as 1.0/0.0, by float operations (a boolean comparison is several times slower):
        # density - u > 0 exactly when u < density (distinct floats never subtract to 0)
        keep = torch.rand(chunk.shape, generator=generator, dtype=torch.float32).neg_().add_(density).sign_().clamp_(min=0.0)
        chunk.mul_(keep.to(chunk.dtype) if chunk.dtype != torch.float32 else keep)  # x * 1 or x * 0
        if rescale:
            chunk.div_(density)
        if record is not None:
            packed = pack_bits(keep)
            start = i * (CHUNK_ELEMENTS // 8)
            record[start:start + packed.numel()].copy_(packed)
    return x


def replay_drop_(x: torch.Tensor, record: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Apply a mask recorded by ``random_drop_`` again: the same values as drawing it afresh."""
    for i, (chunk,) in enumerate(flat_chunks(x)):
        start = i * (CHUNK_ELEMENTS // 8)
        chunk.mul_(unpack_bits(record[start:start + (chunk.numel() + 7) // 8], chunk.numel()))
        if rescale:
            chunk.div_(density)
    return x


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_BIT_VALUES = 2.0 ** torch.arange(8, dtype=torch.float32)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A 1-D 0/1 tensor as uint8 bytes, 8 entries per byte (little-endian bit order).

    Packs with a matrix-vector product against (1, 2, ..., 128): exact in float32, and several times faster
    than a shift-and-sum reduction over groups of 8.
    """
    flags = keep.to(torch.float32)
    pad = (-flags.numel()) % 8
    if pad:
        flags = torch.cat([flags, flags.new_zeros(pad)])
    return (flags.view(-1, 8) @ _BIT_VALUES.to(flags.device)).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: a boolean tensor of ``length`` entries."""
    ones = torch.ones((), dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & ones).view(-1)[:length].bool()


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries (TIES trim, magnitude prune)."""
    thr = topk_threshold(x, density)
    if thr is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x.abs() >= thr


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE)."""
    probs = torch.full(shape, float(density), device=device)
    return torch.bernoulli(probs, generator=generator).bool()


_SAME_ORDER_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def magprune_keep_probs(x: torch.Tensor, density: float, epsilon: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA's MAGPRUNE: per row, keep probability rises linearly with magnitude rank.

    Entry with ascending rank rho in a row of n gets p = (density - eps) + 2 eps rho / (n - 1). Entries of equal
    magnitude in a row are ranked by column (the paper leaves ties open; a plain argsort breaks them arbitrarily).
    ``out``: where to write the probabilities (x's shape and dtype).
    """
    n = x.shape[-1]
    step = 2.0 * epsilon / max(n - 1, 1)
    if _packs(x):
        table = (density - epsilon) + torch.arange(n).to(x.dtype) * step  # the probability of each rank
        probs = torch.empty_like(x) if out is None else out
        return probs.scatter_(-1, row_order(x, scratch("row_order", tuple(x.shape), torch.int64)), table.expand_as(x))
    magnitude = x.abs()
    if magnitude.dtype in _SAME_ORDER_INT and magnitude.device.type == "cpu":
        # non-negative floats sort like their bit patterns as integers, and integer sorts are faster on CPU
        magnitude = magnitude.view(_SAME_ORDER_INT[magnitude.dtype])
    order = torch.argsort(magnitude, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    probs = (density - epsilon) + ranks.to(x.dtype) * step
    return probs if out is None else out.copy_(probs)


def _packs(x: torch.Tensor) -> bool:
    """Whether ``row_order`` applies: a contiguous 2-D float32 CPU tensor whose rows fit 32 bits of index."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous()
            and not x.requires_grad and x.shape[-1] <= 1 << 32)


def row_order(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the columns in ascending order of ``|x|``, ties by column: ``argsort`` of a float32 matrix by a
    sort of values only, about 4x faster on CPU.

    The magnitude's bits (non-negative floats order like their bit patterns as integers, in 31 bits) go above the
    column index (``ceil(log2 n)`` bits) in one int64 key; numpy's vectorised sort of the keys (no index array to
    carry) leaves the order in the low bits. Works in place in ``out`` (int64, x's shape) when given.
    """
    n = x.shape[-1]
    bits = max(1, (n - 1).bit_length())
    key = (torch.empty(x.shape, dtype=torch.int64) if out is None else out).numpy()
    np.bitwise_and(x.numpy().view(np.int32), 0x7FFFFFFF, out=key, dtype=np.int64)  # |x|'s bits, widened
    np.left_shift(key, bits, out=key)
    np.bitwise_or(key, np.arange(n, dtype=np.int64), out=key)
    key.sort(axis=-1)
    np.bitwise_and(key, (1 << bits) - 1, out=key)
    return torch.from_numpy(key) if out is None else out


def keep_band(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` where ``lo <= |x| <= hi``, zero elsewhere, as a new tensor (Breadcrumbs' band), by two vectorised
    ``hardshrink`` passes and a subtraction (boolean masks are several times slower per entry on CPU)."""
    low = shrink_below(x, lo)  # |x| >= lo kept
    if math.isinf(hi) or x.dtype not in (torch.float32, torch.float64):
        return low.masked_fill(low.abs() > hi, 0.0)
    band = low - torch.nn.functional.hardshrink(low, hi)  # x - x = +0.0 where |x| > hi, x - 0 = x where kept
    return band


def band_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and the smallest entries,
    keeping a band of ``density`` of the entries just below the outliers.

    The band is cut by two order statistics of ``|x|`` (``kth_smallest_abs``: no full sort), so with distinct
    magnitudes it is exactly ranks ``[gamma n, gamma n + density n)`` of the descending order; entries tied
    with a boundary value are all kept (a sort would split them arbitrarily).
    """
    n = x.numel()
    n_top = int(gamma * n)
    n_keep = int(density * n)
    if n_keep <= 0 or n_top >= n:
        return torch.zeros_like(x, dtype=torch.bool)
    a = x.abs()
    keep = a <= kth_smallest_abs(x, n - n_top)
    lowest = n - n_top - n_keep + 1  # ascending rank of the smallest entry kept
    if lowest > 1:
        keep &= a >= kth_smallest_abs(x, lowest)
    return keep


def elect_sign(mass: torch.Tensor) -> torch.Tensor:
    """TIES sign election from the summed (trimmed) task vectors, in place.

    Entries whose sum is exactly zero take the sign of the whole tensor's sum
    (the paper's majority rule), +1 if that is zero too.
    """
    fallback = majority_fallback(mass)
    sign = torch.sign(mass)
    sign[sign == 0] = fallback
    return sign


def majority_fallback(mass: torch.Tensor) -> float:
    """The sign given to entries whose summed mass is exactly zero: the sign of the whole tensor's sum."""
    return 1.0 if float(mass.sum()) >= 0 else -1.0


def elect_sign_int8(mass: torch.Tensor) -> torch.Tensor:
    """``elect_sign(mass)`` as an int8 tensor of +1/-1 (a quarter of the memory), computed chunk by chunk."""
    positive_fallback = majority_fallback(mass) > 0
    sign = torch.empty(mass.shape, dtype=torch.int8, device=mass.device)
    for s, m in flat_chunks(sign, mass.contiguous()):
        s.copy_(m >= 0 if positive_fallback else m > 0).mul_(2).sub_(1)
    return sign


# --- blocked passes over a product B @ A (never formed whole) -------------------------------------------------------

BLOCK_ELEMENTS = 1 << 17
"""Entries per row block (512 KiB of float32) in the blocked element-wise merges: a block of ``B_t @ A_t`` is
formed, sparsified and accumulated while it is still in cache, for every adapter, before the next block."""


def row_blocks(d_out: int, d_in: int, block_elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Row ranges of a d_out x d_in matrix, about ``block_elements`` entries each, in memory order."""
    rows = max(1, block_elements // max(d_in, 1))
    return [slice(start, min(start + rows, d_out)) for start in range(0, d_out, rows)]


def product_sample_abs(B: torch.Tensor, A: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``|B @ A|`` at ``count`` uniformly drawn positions, from the factors (O(count * r))."""
    rows = torch.randint(B.shape[0], (count,), generator=generator).to(B.device)
    cols = torch.randint(A.shape[1], (count,), generator=generator).to(B.device)
    # index_select: the same rows as B[rows], several times faster than advanced indexing on CPU
    return (B.index_select(0, rows) * A.T.contiguous().index_select(0, cols)).sum(1).abs_()


def _sorted(x: torch.Tensor) -> torch.Tensor:
    """``x.sort().values``; by numpy's vectorised sort on the CPU (over 10x faster there)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x.numpy()))
    return x.sort().values


def kth_smallest_abs_of_product(B: torch.Tensor, A: torch.Tensor, ranks: list[int]) -> list[float]:
    """``torch.kthvalue(|B @ A|.reshape(-1), rank)`` for each rank, exactly, in one pass of row blocks.

    As ``kth_smallest_abs``: order statistics of a random sample (computed from the factors) bracket each
    answer, one blocked pass counts the entries below each bracket and keeps those inside it, and kthvalue runs
    on those; a missed bracket falls back to a pass that keeps every entry (the value is the same either way).
    """
    d_out, d_in = B.shape[0], A.shape[1]
    n = d_out * d_in
    if n <= 4 * _SAMPLE:
        full = (B @ A).abs_().reshape(-1)
        return [float(torch.kthvalue(full, r).values) for r in ranks]
    sample = _sorted(product_sample_abs(B, A, _SAMPLE, torch.Generator().manual_seed(0)))
    margin = 4.0 * math.sqrt(_SAMPLE) + 8.0
    brackets = []
    for r in ranks:
        centre = r * _SAMPLE / n
        brackets.append((float(sample[max(0, int(centre - margin) - 1)]), float(sample[min(_SAMPLE - 1, int(centre + margin))])))
    found = _bracketed_kth(B, A, ranks, brackets)
    missed = [i for i, v in enumerate(found) if v is None]
    if missed:
        whole = _bracketed_kth(B, A, [ranks[i] for i in missed], [(0.0, math.inf)] * len(missed))
        for i, v in zip(missed, whole):
            found[i] = v
    return [float(v) for v in found]  # type: ignore[arg-type]


def _bracketed_kth(B: torch.Tensor, A: torch.Tensor, ranks: list[int], brackets: list[tuple[float, float]]) -> list[float | None]:
    """One blocked pass: per bracket (lo, hi), the number of entries with |x| <= lo and the entries with
    lo < |x| <= hi; then the answer by kthvalue on those, or None where the rank is outside the bracket.

    On the CPU the counting and selecting run in numpy (vectorised comparisons and a compress: about 3x faster
    per entry than torch's boolean indexing); elsewhere in torch, with float operations only (``hardshrink``
    keeps |x| > lambd)."""
    below = [0] * len(ranks)
    inside: list[list[torch.Tensor]] = [[] for _ in ranks]
    buf = torch.empty(BLOCK_ELEMENTS + A.shape[1], dtype=torch.promote_types(B.dtype, A.dtype), device=B.device)
    on_cpu = buf.device.type == "cpu" and buf.dtype in (torch.float32, torch.float64)
    magnitude = np.empty(buf.numel(), dtype=buf.numpy().dtype) if on_cpu else None
    hardshrink = torch.nn.functional.hardshrink
    for rows in row_blocks(B.shape[0], A.shape[1]):
        block = buf[: (rows.stop - rows.start) * A.shape[1]].view(rows.stop - rows.start, A.shape[1])
        d = torch.matmul(B[rows], A, out=block).view(-1)
        if magnitude is not None:
            a = np.abs(d.numpy(), out=magnitude[: d.numel()])
            for i, (lo, hi) in enumerate(brackets):
                keep = a > lo
                below[i] += a.size - int(np.count_nonzero(keep))
                if math.isfinite(hi):
                    keep &= a <= hi
                inside[i].append(torch.from_numpy(a[keep]))
            continue
        for i, (lo, hi) in enumerate(brackets):
            above_lo = hardshrink(d, lo) if lo > 0 else d.clone()
            below[i] += d.numel() - int(torch.count_nonzero(above_lo.bool()))  # count_nonzero on floats is branchy
            if math.isfinite(hi):
                above_lo.sub_(hardshrink(above_lo, hi))  # nonzero exactly where lo < |x| <= hi
            inside[i].append(above_lo[above_lo.bool()].abs_())
    out: list[float | None] = []
    for r, count, parts in zip(ranks, below, inside):
        if r <= count:  # the answer is <= lo: only when lo is 0 and rank r falls on zeros
            out.append(0.0 if brackets[ranks.index(r)][0] <= 0 else None)
            continue
        candidates = torch.cat(parts)
        out.append(float(torch.kthvalue(candidates, r - count).values) if r <= count + candidates.numel() else None)
    return out


def topk_threshold_of_product(B: torch.Tensor, A: torch.Tensor, density: float) -> float | None:
    """``topk_threshold(B @ A, density)`` without forming the product."""
    n = B.shape[0] * A.shape[1]
    k = int(density * n)
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    return kth_smallest_abs_of_product(B, A, [n - k + 1])[0]
