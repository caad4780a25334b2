"""Intervals and paired comparisons over test examples (numpy only).

Every method is evaluated on the same test examples, so two methods are compared by a *paired* bootstrap:
resample each task's test examples with replacement (the same indices for both methods and for the
fine-tuned adapters that normalize them), recompute the statistic for both, and read the 95% interval of
the difference. A difference whose interval contains 0 is "within noise"."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Correct = Mapping[str, Sequence[int]]   # task -> 0/1 per test example, in the split's order
N_BOOT = 2000


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _indices(correct: Correct, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.integers(0, len(v), size=(n_boot, len(v))) for t, v in correct.items()}


def _stat(correct: Correct, idx: Mapping[str, np.ndarray], finetuned: Correct | None) -> np.ndarray:
    """[n_boot] mean over tasks of accuracy (or accuracy / fine-tuned accuracy) on each resample."""
    per_task = []
    for t, v in correct.items():
        acc = np.asarray(v, dtype=float)[idx[t]].mean(1)
        if finetuned is not None:
            acc = acc / np.maximum(np.asarray(finetuned[t], dtype=float)[idx[t]].mean(1), 1e-9)
        per_task.append(acc)
    return np.mean(per_task, axis=0)


def point(correct: Correct, finetuned: Correct | None = None) -> float:
    per_task = []
    for t, v in correct.items():
        acc = float(np.mean(v))
        if finetuned is not None:
            acc /= max(float(np.mean(finetuned[t])), 1e-9)
        per_task.append(acc)
    return float(np.mean(per_task))


def interval(correct: Correct, finetuned: Correct | None = None, n_boot: int = N_BOOT,
             seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the task-averaged (normalized, when ``finetuned``) accuracy."""
    stats = _stat(correct, _indices(correct, n_boot, seed), finetuned)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired(a: Correct, b: Correct, finetuned: Correct | None = None, n_boot: int = N_BOOT,
           seed: int = 0) -> dict:
    """Paired bootstrap of ``a - b`` on the same test examples: the difference, its 95% interval, a two-sided
    bootstrap p-value and whether the difference is within noise (interval contains 0)."""
    if set(a) != set(b) or any(len(a[t]) != len(b[t]) for t in a):
        raise ValueError("paired comparison needs the same tasks and test examples")
    idx = _indices(a, n_boot, seed)
    diff = _stat(a, idx, finetuned) - _stat(b, idx, finetuned)
    lo, hi = float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))
    p = float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    return {"diff": point(a, finetuned) - point(b, finetuned), "lo": lo, "hi": hi, "p": p,
            "within_noise": lo <= 0.0 <= hi}


def summary(correct: Correct, finetuned: Correct | None) -> dict:
    """Point values and 95% intervals of the task-averaged absolute and normalized accuracy."""
    out = {"acc": point(correct), "acc_ci": interval(correct)}
    if finetuned is not None:
        out.update({"norm": point(correct, finetuned), "norm_ci": interval(correct, finetuned)})
    return out
