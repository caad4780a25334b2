"""Whole modules merged in worker processes, each on one thread: how large element-wise merges use every core.

Within one module, the blocked element-wise passes split among Python threads (``threads.py``) gain nothing from
a second core on a 2-core machine (measured: one 4096 x 4096 TIES module's merge pass took 0.50 s on one thread
and 0.51-0.58 s on two): each block is dozens of operations of a few tens of microseconds, and the threads queue
for the GIL between them. Two processes each merging their own modules on one thread run side by side at about
0.85x of one alone, so they finish a module set 1.7x sooner. ``ordered_map`` runs a module function in a pool of
spawned processes (spawn, never fork: a forked child of a process that has run OpenMP may hang), a bounded
number of modules in flight (memory stays a few modules' worth), the results coming back in the modules' order.
Each worker holds its own torch runtime (a few hundred MiB of resident memory, much of it shared library pages).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

ENV = "LORAMERGE_PROCESSES"
"""Environment override of the number of worker processes (``0`` or ``1``: merge in this process only)."""

started = 0
"""How many worker processes the last ``ordered_map`` of this process started (0: none yet); for benchmarks."""


def process_workers() -> int:
    """How many worker processes a large CPU merge uses: ``LORAMERGE_PROCESSES`` if set, else torch's intra-op
    thread count (what the user allowed this process: ``OMP_NUM_THREADS`` / ``torch.set_num_threads``)."""
    import torch

    configured = os.environ.get(ENV, "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            return 1
    return max(1, torch.get_num_threads())


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextmanager
def _main_hidden() -> Iterator[None]:
    """While workers start, ``__main__`` names no file or module: a spawned child would otherwise import the
    user's script again (running its top-level code, unguarded by ``if __name__ == "__main__"``). The workers
    need nothing from it: they run loramerge's functions on loramerge's objects."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """A spawned pool with all its workers started (each on one thread) while ``__main__`` is hidden."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)
    with _main_hidden():
        for ready in [pool.submit(int) for _ in range(workers)]:  # workers start as tasks arrive
            ready.result()
    return pool


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None) -> Iterator[R]:
    """``(fn(x) for x in items)`` computed by ``workers`` processes, at most ``ahead`` (default ``workers + 1``)
    items in flight; results are yielded in the items' order. ``fn`` and the items must pickle (``fn``: a
    module-level function). With ``workers <= 1`` everything runs here."""
    if workers <= 1:
        yield from map(fn, items)
        return
    global started
    # a pool per call, shut down at its end: a long-lived process (a server, a notebook) keeps no idle workers,
    # and starting them (~2 s of imports) is small next to the merges large enough to use them
    pool = _start_pool(workers)
    started = workers
    window: deque[Future] = deque()
    limit = max(1, ahead if ahead is not None else workers + 1)
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= limit:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a consumer that stops early (or an error) leaves nothing
