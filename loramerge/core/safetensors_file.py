"""The safetensors layer of an adapter: the header parsed (and checked) by us, tensors read by positioned reads
from a file opened once."""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.errors import AdapterLoadError


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor's bytes lie in a safetensors file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorFile:
    """A weight file opened once; each read is one positioned read into a fresh buffer (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for the adapter's life
        self._lock = threading.Lock()

    def read(self, layout: TensorLayout) -> torch.Tensor:
        buf = bytearray(layout.nbytes)
        if hasattr(os, "preadv"):
            got = os.preadv(self._fh.fileno(), [buf], layout.offset)
        else:  # pragma: no cover - platforms without preadv
            with self._lock:
                self._fh.seek(layout.offset)
                got = self._fh.readinto(buf)
        if got != layout.nbytes:
            raise ValueError(f"short read: {got} of {layout.nbytes} bytes (was the file truncated?)")
        if layout.nbytes == 0:
            return torch.empty(layout.shape, dtype=layout.dtype)
        return torch.frombuffer(buf, dtype=layout.dtype).reshape(layout.shape)

    def close(self) -> None:
        self._fh.close()

    def __del__(self) -> None:
        self._fh.close()


def read_with_safetensors(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)
    except Exception as exc:
        raise AdapterLoadError(
            f"could not read tensor '{key}': {exc}", path=str(path),
            fix="the weight file is damaged; re-download or re-save the adapter",
        ) from exc


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


def _int_list(value: object) -> bool:
    """A JSON list of non-negative integers (bools are not integers here)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_header(path: Path) -> dict[str, TensorLayout]:
    """Parse the safetensors header ourselves so a corrupt file fails with a clear message."""
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(raw_len, "little")
            size = path.stat().st_size
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - n
        out = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
                raise ValueError(f"bad entry for '{key}'")
            offsets, shape = meta["data_offsets"], meta["shape"]
            if not (_int_list(offsets) and len(offsets) == 2 and _int_list(shape)):
                raise ValueError(f"tensor '{key}' has malformed shape {shape!r} or data_offsets {offsets!r}")
            start, end = offsets
            if not (0 <= start <= end <= data_len):
                raise ValueError(f"tensor '{key}' points past the end of the file (truncated?)")
            dtype = _ST_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
            if dtype is None:
                raise ValueError(f"tensor '{key}' has unsupported dtype {meta['dtype']}")
            shape = tuple(shape)
            if math.prod(shape) * torch.empty((), dtype=dtype).element_size() != end - start:
                raise ValueError(f"tensor '{key}' size does not match its shape {shape}")
            out[key] = TensorLayout(offset=8 + n + start, nbytes=end - start, shape=shape, dtype=dtype)
        return out
    except (OSError, ValueError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(
            f"corrupt or truncated safetensors file: {str(exc)[:300]}", path=str(path),
            fix="re-download or re-save the adapter",
        ) from exc


__all__ = ["TensorFile", "TensorLayout", "read_header", "read_with_safetensors"]
