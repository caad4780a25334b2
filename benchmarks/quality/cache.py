"""Content-addressed caches: an adapter, a statistic or an evaluation is recomputed only when something it
depends on (data, model, settings that matter, the merged weights themselves) has changed.

- ``content_key(...)``: sha256 of a JSON description (settings, data digests, model digest).
- Evaluations are keyed by the *weights evaluated* (sha256 of every module's B and A), the split's
  examples and the model, so a code change that leaves a merge's output unchanged costs only the merge,
  and one that changes it re-evaluates exactly that merge."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

SCORING = "option-loglik-sum/v2"
"""Bump when the scoring changes (every cached evaluation then becomes stale)."""


def content_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered next to it (keyed by size and mtime)."""
    stat = path.stat()
    side = path.with_name(path.name + ".sha256")
    tag = f"{stat.st_size}:{stat.st_mtime_ns}"
    if side.exists():
        known_tag, _, digest = side.read_text().partition(" ")
        if known_tag == tag:
            return digest.strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    side.write_text(f"{tag} {h.hexdigest()}")
    return h.hexdigest()


def deltas_digest(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(deltas):
        B, A = deltas[name]
        h.update(name.encode())
        for t in (B, A):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class EvalCache:
    """Per-example correctness of (weights, split, model) on disk: cache/evals/ab/abcd....json."""

    def __init__(self, root: Path, model_digest: str):
        self.root = root
        self.model_digest = model_digest
        self.hits = 0
        self.misses = 0

    def _path(self, weights: str, data: str, part: str) -> Path:
        key = content_key(scoring=SCORING, model=self.model_digest, weights=weights, data=data, part=part)
        return self.root / key[:2] / f"{key}.json"

    def get(self, weights: str, data: str, part: str) -> list[int] | None:
        path = self._path(weights, data, part)
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())["correct"]
        self.misses += 1
        return None

    def put(self, weights: str, data: str, part: str, correct: list[int]) -> None:
        path = self._path(weights, data, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"correct": correct}))
        tmp.replace(path)
