"""Time and peak extra memory of the LoRA-space merge methods against dense references of the same methods.

Inputs: one Llama-3.2-1B-shaped layer (hidden 2048, intermediate 8192, 8 KV heads of 64 -> k/v out 512),
its 7 projections, N adapters of rank r with random factors, built in memory (no model, no files).

Each entry is ``(name, factored_fn, dense_fn)``: both take the list of per-module ``ModuleInputs`` and
yield one result per module (the factored one a ``Factored(B, A)``, the dense one a d_out x d_in
delta), so an entry may run a model-wide pass first (KnOTS' global trim). Time is wall-clock per
module; memory is the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs after
``malloc_trim``) minus the RSS before each module, so it covers torch's allocator, which tracemalloc
does not see. The dense references follow the authors' code (full SVDs of dense deltas: float32 for
TSV-M, Iso and STAR, float64 for KnOTS) with the same LoRA reading as the factored methods, and each
module's outputs are compared (max relative Frobenius difference) outside the measured window.

Add a method: append an ``Entry`` to ``ENTRIES``.

    .venv/bin/python benchmarks/lora_methods.py                        # 1 thread, ~40 min of CPU
    .venv/bin/python benchmarks/lora_methods.py --dense-modules q_proj --methods tsv,iso_c   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loramerge.core.adapter import LoraFactors
from loramerge.core.ops import topk_threshold
from loramerge.merging.methods import Factored, ModuleInputs, get_method

Result = Factored | torch.Tensor
Runner = Callable[[Sequence[ModuleInputs]], Iterator[Result]]


@dataclass(frozen=True)
class Entry:
    """One benchmarked method: its factored implementation and a dense reference of the same method."""

    name: str
    factored: Runner
    dense: Runner
    dense_only_on: tuple[str, ...] = ()
    """Projections the dense reference is limited to because it is too slow elsewhere (empty: no limit)."""


# --- inputs -------------------------------------------------------------------------------------------------------


def llama_1b_layer(hidden: int, intermediate: int, kv_dim: int) -> list[tuple[str, int, int]]:
    """(projection, d_out, d_in) for one decoder layer."""
    return [
        ("q_proj", hidden, hidden), ("k_proj", kv_dim, hidden), ("v_proj", kv_dim, hidden), ("o_proj", hidden, hidden),
        ("gate_proj", intermediate, hidden), ("up_proj", intermediate, hidden), ("down_proj", hidden, intermediate),
    ]


def make_modules(shapes: list[tuple[str, int, int]], tasks: int, rank: int, seed: int = 0) -> list[ModuleInputs]:
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for name, d_out, d_in in shapes:
        factors = []
        for _ in range(tasks):
            A = torch.randn(rank, d_in, generator=gen).div_(d_in**0.5)
            B = torch.randn(d_out, rank, generator=gen).mul_(0.02)
            factors.append(LoraFactors(A=A, B=B))
        modules.append(ModuleInputs(name=f"model.layers.0.{name}", factors=tuple(factors), weights=(1.0,) * tasks,
                                    adapter_names=tuple(f"task{t}" for t in range(tasks)), seed=0))
    return modules


# --- factored runners (the registry methods, prepare pass included) -------------------------------------------------


def registry_method(name: str, **parameters) -> Runner:
    method = get_method(name)
    cfg = method.make_config(parameters)

    def run(modules: Sequence[ModuleInputs]) -> Iterator[Result]:
        context = method.prepare(cfg, lambda: iter(modules)) if method.prepare else None
        for inputs in modules:
            yield method.fn(cfg, replace(inputs, context=context))

    return run


# --- dense references (full SVDs of d_out x d_in matrices, as in the authors' code) -------------------------------


def _dense_deltas(inputs: ModuleInputs, dtype=torch.float32) -> list[torch.Tensor]:
    return [w * (f.B.to(dtype) @ f.A.to(dtype)) for f, w in inputs.weighted()]


def _svd(M: torch.Tensor, floor: float = 0.0, rtol: float = 1e-6):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = int(((S > rtol * S[0]) & (S > floor)).sum())
    return U[:, :keep], S[:keep], Vh[:keep]


def _procrustes(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def dense_tsv(modules: Sequence[ModuleInputs]) -> Iterator[Result]:
    for inputs in modules:
        d_out, d_in = inputs.factors[0].d_out, inputs.factors[0].d_in
        k = max(min(d_out, d_in) // len(inputs.factors), 1)
        # keep at most the adapter's rank: float32 SVD noise above it would enter the Procrustes step
        parts = [_svd(d) for d in _dense_deltas(inputs)]
        ks = [min(k, r) for r in inputs.ranks]
        U = _procrustes(torch.cat([p[0][:, :kt] for p, kt in zip(parts, ks, strict=True)], dim=1))
        V = _procrustes(torch.cat([p[2][:kt].T for p, kt in zip(parts, ks, strict=True)], dim=1))
        yield (U * torch.cat([p[1][:kt] for p, kt in zip(parts, ks, strict=True)])) @ V.T


def dense_iso_c(modules: Sequence[ModuleInputs], rtol: float = 1e-3) -> Iterator[Result]:
    for inputs in modules:
        M = sum(_dense_deltas(inputs))
        U, S, Vh = _svd(M, rtol=rtol)
        yield S.mean() * (U @ Vh)


def dense_iso_cts(modules: Sequence[ModuleInputs], fraction: float = 0.8, rtol: float = 1e-3) -> Iterator[Result]:
    for inputs in modules:
        ds = _dense_deltas(inputs)
        T = len(ds)
        K = min(sum(inputs.ranks), *ds[0].shape)
        common = int(K * fraction)
        per_task = round((K - common) / T)
        common = K - T * per_task
        U, S, Vh = _svd(sum(ds), rtol=rtol)
        floor = rtol * float(S[0])
        Uc = U[:, :common]
        Us, Ss, Vs = [Uc], [S[:common]], [Vh[:common].T]
        for d in ds:
            u, s, vh = _svd(d - Uc @ (Uc.T @ d), floor=floor)
            Us.append(u[:, :per_task])
            Ss.append(s[:per_task])
            Vs.append(vh[:per_task].T)
        s_mean = torch.cat(Ss).mean()
        yield s_mean * (_procrustes(torch.cat(Us, dim=1)) @ _procrustes(torch.cat(Vs, dim=1)).T)


def dense_star(modules: Sequence[ModuleInputs], eta: float = 40.0) -> Iterator[Result]:
    for inputs in modules:
        acc = None
        for d in _dense_deltas(inputs):
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            total = S.sum()
            k = min(int(torch.searchsorted(torch.cumsum(S, 0), total * eta / 100)) + 1, S.numel())
            part = (U[:, :k] * (S[:k] * total / S[:k].sum())) @ Vh[:k]
            acc = part if acc is None else acc.add_(part)
        yield acc / sum(inputs.weights)


def dense_knots(modules: Sequence[ModuleInputs], density: float = 0.2) -> Iterator[Result]:
    """KnOTS-TIES with the global trim, as the authors' code: dense float64 SVD of [dW_1 | ... | dW_T] per module,
    every module's coordinates held, one top-k threshold per task over all of them, then elect + disjoint mean."""
    bases, coords = [], []
    for inputs in modules:
        U, S, Vh = _svd(torch.cat(_dense_deltas(inputs, torch.float64), dim=1))
        bases.append(U)
        coords.append(list((S[:, None] * Vh).chunk(len(inputs.factors), dim=1)))
    names = sorted({n for inputs in modules for n in inputs.adapter_names})
    pooled = {n: torch.cat([zs[t].reshape(-1) for inputs, zs in zip(modules, coords, strict=True)
                            for t, m in enumerate(inputs.adapter_names) if m == n]) for n in names}
    thresholds = {n: topk_threshold(v, density) for n, v in pooled.items()}
    del pooled
    for inputs, U, zs in zip(modules, bases, coords, strict=True):
        trimmed = [z if thresholds[n] is None else torch.where(z.abs() >= thresholds[n], z, 0.0)
                   for z, n in zip(zs, inputs.adapter_names, strict=True)]
        mass = torch.stack(trimmed).sum(0)
        sign = torch.where(mass == 0, 1.0 if float(mass.sum()) >= 0 else -1.0, torch.sign(mass))
        agree = [(z != 0) & (torch.sign(z) == sign) for z in trimmed]
        total = sum(torch.where(a, z, 0.0) for a, z in zip(agree, trimmed, strict=True))
        count = sum(a.double() for a in agree).clamp(min=1.0)
        yield U @ (total / count)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

ENTRIES: list[Entry] = [
    Entry("tsv", registry_method("tsv"), dense_tsv),
    Entry("iso_c", registry_method("iso_c"), dense_iso_c),
    Entry("iso_cts", registry_method("iso_cts"), dense_iso_cts),
    Entry("star", registry_method("star"), dense_star),
    # dense float64 SVD of an 8192 x 16384 matrix per MLP projection takes tens of minutes on one core
    Entry("knots (ties, global trim)", registry_method("knots"), dense_knots, ATTENTION),
]


# --- measurement ----------------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Release freed heap pages, reset the peak-RSS mark; return the RSS (KiB) now."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS")


@dataclass
class Measured:
    seconds: float = 0.0
    peak_extra_mib: float = 0.0
    results: dict[str, Result] | None = None


def measure(runner: Runner, modules: Sequence[ModuleInputs], keep: Callable[[str], bool],
            clock: Callable[[], float] = time.process_time) -> Measured:
    """Run one implementation module by module; time and peak extra RSS per module (the max is reported)."""
    out = Measured(results={})
    stream = runner(modules)
    for inputs in modules:
        before = _reset_peak()
        start = clock()
        result = next(stream)
        out.seconds += clock() - start
        out.peak_extra_mib = max(out.peak_extra_mib, (_status_kib("VmHWM") - before) / 1024)
        if keep(inputs.name):
            out.results[inputs.name] = result
        del result
    return out


def _dense_of(result: Result) -> torch.Tensor:
    return result.B.double() @ result.A.double() if isinstance(result, Factored) else result.double()


def rel_diffs(a: dict[str, Result], b: dict[str, Result]) -> dict[str, float]:
    """Per module, ||a - b||_F / ||b||_F."""
    out = {}
    for name in b:
        x, y = _dense_of(a[name]), _dense_of(b[name])
        out[name] = float((x - y).norm() / y.norm())
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


# --- report ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    shapes = llama_1b_layer(args.hidden, args.intermediate, args.kv_dim)
    wanted = [s[0] for s in shapes] if args.dense_modules == "all" else args.dense_modules.split(",")
    unknown = set(wanted) - {s[0] for s in shapes}
    if unknown:
        raise SystemExit(f"unknown --dense-modules {sorted(unknown)}; choose from {[s[0] for s in shapes]} or 'all'")
    modules = make_modules(shapes, args.tasks, args.rank)
    entries = [e for e in ENTRIES if not args.methods or e.name.split()[0] in args.methods.split(",")]
    R = args.tasks * args.rank
    bound = max((d_out + d_in) * R * 4 for _, d_out, d_in in shapes) / 2**20
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    warm = make_modules([("q_proj", 64, 48), ("down_proj", 48, 96)], args.tasks, min(args.rank, 4), seed=1)
    for entry in entries:  # lazy library initialisation (LAPACK, thread pools) stays out of the measurements
        list(entry.factored(warm)), list(entry.dense(warm))
    rows = []
    for entry in entries:
        allowed = [p for p in wanted if not entry.dense_only_on or p in entry.dense_only_on]
        subset = [m for m in modules if m.name.rsplit(".", 1)[-1] in allowed]
        full = measure(entry.factored, modules, keep=lambda _: False, clock=clock)
        small = measure(entry.factored, subset, keep=lambda _: True, clock=clock)
        dense = measure(entry.dense, subset, keep=lambda _: True, clock=clock)
        diffs = rel_diffs(small.results, dense.results)
        rows.append((
            entry.name, "all 7" if len(allowed) == len(shapes) else ", ".join(allowed), f"{full.seconds:.3f}", f"{full.peak_extra_mib:.1f}", f"{small.seconds:.3f}",
            f"{dense.seconds:.2f}", f"{dense.seconds / small.seconds:.0f}x", f"{small.peak_extra_mib:.1f}",
            f"{dense.peak_extra_mib:.1f}", f"{max(diffs.values()):.1e}",
        ))
        print(f"  {entry.name}: done; rel. diff per module {diffs}", flush=True)
    header = ("method", "dense ref on", "factored, full layer (s)", "factored peak extra, full layer (MiB)",
              "factored, same modules (s)", "dense ref (s)", "speedup",
              "factored peak extra, same modules (MiB)", "dense peak extra (MiB)", "max rel. diff")
    lines = [
        f"LoRA-space merge methods vs dense references: one Llama-3.2-1B-shaped layer "
        f"(hidden {args.hidden}, intermediate {args.intermediate}, k/v out {args.kv_dim}; 7 projections), "
        f"N = {args.tasks} adapters of rank {args.rank} (R = {R}), random factors, default parameters.",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s), {_cpu_name()}; times are "
        + ("process CPU seconds (robust to a shared machine; equal to wall time for one thread on an idle one). "
           if args.clock == "cpu" else "wall-clock seconds. ")
        +
        "The dense reference of each method runs on the projections in 'dense ref on' (fewer than 7 where it is "
        "too slow); 'speedup' compares it with the factored method on the same projections.",
        f"Memory: peak RSS (VmHWM after clear_refs) minus RSS before each module, max over modules; "
        f"O((d_in + d_out) R) reference for the largest module: {bound:.1f} MiB of float32.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--kv-dim", type=int, default=512)
    parser.add_argument("--dense-modules", default="all",
                        help="projections the dense references run on, comma-separated, or 'all' (default; entries "
                        "may limit themselves further)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="process CPU time (default; robust when the machine is shared) or wall-clock time")
    parser.add_argument("--methods", default="", help="comma-separated subset of entry names (default all)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "lora_methods.md")
    args = parser.parse_args(argv)
    table = run(args)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)


if __name__ == "__main__":
    main()
