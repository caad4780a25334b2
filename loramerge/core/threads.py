"""A few CPU tasks at once, each on one intra-op thread: how the element-wise merges use several cores.

The element-wise passes are long runs of small tensor operations on blocks of a few hundred KiB; torch's own
intra-op parallelism splits each of them across threads and synchronises after every one, which gains little
on such sizes (about 1.3x from two cores, measured). Splitting the work itself (the adapters of a block, or the
halves of a block) among as many Python threads as torch has intra-op threads, each running its operations on
one thread, keeps every core busy: torch and numpy release the GIL inside their kernels.

``torch.set_num_threads`` acts on the calling thread's OpenMP and MKL settings (and on the default that threads
started later inherit), so each task sets one thread for itself and restores the caller's count when it ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def cpu_workers(device: torch.device | str = "cpu") -> int:
    """How many tasks to run at once on ``device``: torch's intra-op thread count on the CPU (1 inside a task,
    so tasks never nest), 1 elsewhere (a GPU parallelises each operation itself)."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loramerge")
        return _pools[workers]


def _forget_pools() -> None:  # a forked child has none of the parent's threads
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]``, with up to ``workers`` calls at once, each on one intra-op thread.

    The results come back in the items' order; with ``workers <= 1`` (or one item) the calls run here, in order.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    restore = torch.get_num_threads()

    def task(x: T) -> R:
        torch.set_num_threads(1)
        try:
            return fn(x)
        finally:
            torch.set_num_threads(restore)

    return list(_pool(min(workers, len(items))).map(task, items))


def split_range(n: int, parts: int) -> list[slice]:
    """``range(n)`` in ``parts`` contiguous slices of nearly equal length (fewer when ``n`` is small)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reusable buffer of ``shape`` (contents undefined), one per (thread, name): the blocked passes ask for the
    same sizes block after block, and fresh arrays of a few hundred KiB each time cost page faults. Valid until the
    same thread asks for ``name`` again."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, torch.device(device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)
