"""Merge speed and memory: loramerge against PEFT's ``add_weighted_adapter`` on the same LoRA adapters.

Adapters (rank 16, alpha 32, all 7 Llama projections, random non-zero A and B) are written once with PEFT's
``save_pretrained`` on a stub base model that holds only Llama-3.2-1B- or Llama-3.1-8B-shaped decoder layers
(their ``nn.Linear`` weights are allocated uninitialised and never touched). Then every case runs in its own fresh
subprocess, so one case's allocator caches never hide another's peak:

- ``loramerge``: the method functions called directly on ``ModuleInputs`` (factors already in memory, as in PEFT),
  followed by the rank policy (``compress_factored`` / ``compress_dense``), module by module.
- ``loramerge.merge``: the public API on the adapter directories, so the time includes reading the safetensors.
- ``peft``: ``PeftModel.add_weighted_adapter`` on a ``PeftModel`` holding the same adapters.

Measured per case:

- wall time (``time.perf_counter``) of the merge call; fast calls are repeated and the minimum is reported
  (the first, cold call is kept in the raw numbers);
- peak extra resident memory: the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), reset by writing
  ``5`` to ``/proc/self/clear_refs`` just before the first timed call, minus the resident size at that moment.
  tracemalloc does not see torch's allocations, and a sampling thread can miss short-lived peaks; the kernel's
  high-water mark cannot. A fresh process per case keeps glibc's free lists from hiding allocations, and a warm-up
  call on a small module first pages in the library code (about 25 MiB), which is not merge memory.
- peak live memory: glibc's ``mallinfo2`` bytes in use, sampled every millisecond during the same call: what the
  program holds, without what the allocator keeps resident after frees (a lower bound; see ``LiveHeapSampler``).
- each result's relative Frobenius error against the exact weighted sum ``sum_i w_i * scale * B_i A_i``, computed
  densely in float64 per module from the raw safetensors (independently of both tools), after the timed region.
  The worst module is reported. ``trunc. err`` is the error against the method's own dense result (what the
  rank truncation cost): loramerge reports it, and for PEFT's ``ties_svd`` it is recomputed with PEFT's own
  ``merge_utils.ties``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/merge_speed.py            # --quick: about 12 minutes on a 2-core CPU
    .venv/bin/python benchmarks/merge_speed.py --full     # every shape, N and method: about 4 hours (PEFT's SVDs)
    .venv/bin/python benchmarks/merge_speed.py --full --shapes 1b --n 4   # a subset
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MARKDOWN = ROOT / "benchmarks" / "results" / "merge_speed.md"
DEFAULT_PLOT = ROOT / "docs" / "img" / "merge_speed.png"

RANK = 16
ALPHA = 32
SCALE = ALPHA / RANK
PEFT_PREFIX = "base_model.model."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP
ONE_MLP = ("up_proj",)
MIB = 1024 * 1024

Side = Literal["loramerge", "loramerge.merge", "peft"]


@dataclass(frozen=True)
class Shape:
    """A Llama decoder layer's projection sizes (GQA: k/v project to ``kv`` features)."""

    name: str
    hidden: int
    intermediate: int
    kv: int

    def dims(self, proj: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }[proj]


SHAPES = {
    "1b": Shape("Llama-3.2-1B", hidden=2048, intermediate=8192, kv=512),
    "8b": Shape("Llama-3.1-8B", hidden=4096, intermediate=14336, kv=1024),
}


@dataclass(frozen=True)
class Method:
    """One row label: which tool, which method, which parameters and output rank."""

    key: str
    side: Literal["loramerge", "peft"]
    name: str
    kind: Literal["factored", "elementwise"]
    rank: str | int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


METHODS = {
    m.key: m
    for m in (
        Method("task_arithmetic/exact", "loramerge", "task_arithmetic", "factored", rank="exact"),
        Method("task_arithmetic/16", "loramerge", "task_arithmetic", "factored", rank=16),
        Method("ties/auto", "loramerge", "ties", "elementwise", rank="auto", parameters={"density": 0.2}),
        Method("dare_ties/auto", "loramerge", "dare_ties", "elementwise", rank="auto", parameters={"density": 0.5}),
        Method("svd", "peft", "svd", "factored"),
        Method("cat", "peft", "cat", "factored"),
        Method("ties_svd", "peft", "ties_svd", "elementwise", parameters={"density": 0.2}),
        Method("dare_ties_svd", "peft", "dare_ties_svd", "elementwise", parameters={"density": 0.5}),
    )
}
LORAMERGE_KEYS = [k for k, m in METHODS.items() if m.side == "loramerge"]
PEFT_KEYS = [k for k, m in METHODS.items() if m.side == "peft"]


@dataclass(frozen=True)
class Case:
    shape: str
    layers: int
    targets: tuple[str, ...]
    n: int
    side: Side
    method: str

    @property
    def label(self) -> str:
        return f"{self.shape} {self.layers}x[{','.join(self.targets)}] N={self.n} {self.side}:{self.method}"


# --------------------------------------------------------------------------------------------- adapters


def adapter_weights(n: int) -> list[float]:
    """Distinct merge weights with mean 1/N (so no method gets the easy all-equal case)."""
    if n == 1:
        return [1.0]
    return [(0.5 + i / (n - 1)) / n for i in range(n)]


def build_stub(shape: Shape, layers: int, targets: tuple[str, ...]) -> torch.nn.Module:
    """A model holding only Llama-shaped projections, named like Llama's, with uninitialised weights.

    Created on the meta device and materialised with ``to_empty``: no init cost, and the untouched pages of the
    base weights never become resident, so they do not distort the memory numbers.
    """
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for _ in range(layers):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        for proj in targets:
            d_out, d_in = shape.dims(proj)
            parent = layer.self_attn if proj in ATTENTION else layer.mlp
            setattr(parent, proj, torch.nn.Linear(d_in, d_out, bias=False, device="meta"))
        root.model.layers.append(layer)
    return root.to_empty(device="cpu")


def write_adapters(shape_key: str, layers: int, targets: tuple[str, ...], count: int, root: Path) -> list[str]:
    """Write ``count`` PEFT adapters (random non-zero A and B, seeded) for the stub; return their directories."""
    from peft import LoraConfig, get_peft_model

    shape = SHAPES[shape_key]
    dirs = []
    for i in range(count):
        model = build_stub(shape, layers, targets)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(1000 * i + 7)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = f"stub-{shape.name}"
        out = root / f"{shape_key}-{layers}x{'-'.join(targets)}-{i}"
        peft_model.save_pretrained(str(out))
        dirs.append(str(out))
    return dirs


def reference_deltas(dirs: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """The exact weighted sum per module, dense float64, read straight from the safetensors (no tool involved)."""
    from safetensors import safe_open

    total: dict[str, torch.Tensor] = {}
    for path, w in zip(dirs, weights):
        with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(".lora_A.weight"):
                    continue
                module = key[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
                A = fh.get_tensor(key).double()
                B = fh.get_tensor(key.replace(".lora_A.", ".lora_B.")).double()
                delta = (w * SCALE) * (B @ A)
                total[module] = delta if module not in total else total[module].add_(delta)
    return total


def relative_errors(results: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    if set(results) != set(reference):
        raise RuntimeError(f"merged modules {sorted(results)} differ from the inputs' {sorted(reference)}")
    return {
        name: float(torch.linalg.norm(results[name] - reference[name]) / torch.linalg.norm(reference[name]))
        for name in reference
    }


# --------------------------------------------------------------------------------------------- measuring


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


class LiveHeapSampler:
    """Peak of the bytes glibc's malloc has handed out and not got back (``mallinfo2``: heap in use + mmapped),
    sampled every millisecond in a thread: what the program holds, without the allocator's retained free memory
    or newly paged-in library code. A lower bound (it cannot see inside one long C call such as a LAPACK SVD's
    workspace); ``None`` where glibc's mallinfo2 is missing."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        try:
            import ctypes

            class _MallInfo2(ctypes.Structure):
                _fields_ = [(name, ctypes.c_size_t) for name in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                    "keepcost")]

            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _MallInfo2
            self._mallinfo = libc.mallinfo2
        except (OSError, AttributeError):
            self._mallinfo = None

    def _in_use(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def _loop(self, baseline: int) -> None:
        peak = 0
        while not self._stop.is_set():
            peak = max(peak, self._in_use() - baseline)
            self.peak_bytes = peak
            time.sleep(0.001)

    def __enter__(self) -> LiveHeapSampler:
        if self._mallinfo is not None:
            self._thread = threading.Thread(target=self._loop, args=(self._in_use(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mallinfo is not None:
            self._stop.set()
            self._thread.join()


def measure(
    run: Callable[[], Any], reset: Callable[[], None], repeats: int, budget_s: float
) -> tuple[Any, list[float], float, float | None]:
    """Time ``run`` (repeating while it is fast); return (last output, times, peak extra RSS MiB and peak live
    heap MiB of the first call).

    ``reset`` undoes a run's side effects before the next repeat (PEFT keeps the merged adapter in the model).
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    with LiveHeapSampler() as live:
        started = time.perf_counter()
        out = run()
        times = [time.perf_counter() - started]
    peak_mib = (_status_kib("VmHWM") - baseline) / 1024
    live_mib = None if live.peak_bytes is None else live.peak_bytes / MIB
    while len(times) < repeats and sum(times) < budget_s:
        del out
        reset()
        gc.collect()
        started = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - started)
    return out, times, peak_mib, live_mib


# --------------------------------------------------------------------------------------------- one case (worker)


def _loramerge_direct(method: Method, dirs: list[str], weights: list[float]):
    """Prepare the in-memory factors; return (run, reset) for the method functions called directly."""
    from loramerge import RankPolicy, get_method, load_adapter
    from loramerge.core.factored import compress_dense, compress_factored
    from loramerge.core.ops import derive_seed
    from loramerge.merging.methods import Dense, ModuleInputs

    adapters = [load_adapter(d, name=f"a{i}") for i, d in enumerate(dirs)]
    modules = sorted(adapters[0].modules)
    factors = {m: tuple(a.factors(m) for a in adapters) for m in modules}
    names = tuple(a.name for a in adapters)
    merge_method = get_method(method.name)
    cfg = merge_method.make_config(method.parameters)
    policy = RankPolicy.parse(method.rank)

    def run() -> dict[str, Any]:
        out = {}
        for m in modules:
            inputs = ModuleInputs(name=m, factors=factors[m], weights=tuple(weights), adapter_names=names, seed=0)
            result = merge_method.fn(cfg, inputs)
            if isinstance(result, Dense):
                out[m] = compress_dense(result.delta, policy, inputs.ranks, seed=derive_seed(0, "compress", m))
            else:
                out[m] = compress_factored(result.B, result.A, policy, inputs.ranks)
            del result  # a module's dense delta must not outlive it (loramerge.merge keeps it one module longer)
        return out

    def collect(out: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[int], float]:
        deltas = {m: c.B.double() @ c.A.double() for m, c in out.items()}
        return deltas, [c.rank for c in out.values()], max(c.rel_error for c in out.values())

    return run, (lambda: None), collect


def _loramerge_api(method: Method, dirs: list[str], weights: list[float]):
    """The public ``loramerge.merge`` on the adapter directories (includes reading the files)."""
    import loramerge

    def run():
        return loramerge.merge(adapters=dirs, weights=weights, method=method.name, parameters=method.parameters,
                               rank=method.rank, seed=0)

    def collect(result) -> tuple[dict[str, torch.Tensor], list[int], float]:
        deltas = {name: f.B.double() @ f.A.double() for name, f in result.factors().items()}
        return deltas, [m.rank for m in result.modules], result.max_rel_error

    return run, (lambda: None), collect


def _peft(method: Method, case: Case, dirs: list[str], weights: list[float]):
    """A PeftModel holding the same adapters; the merge is ``add_weighted_adapter``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.merge_utils import ties

    model = PeftModel.from_pretrained(build_stub(SHAPES[case.shape], case.layers, case.targets), dirs[0],
                                      adapter_name="a0")
    names = ["a0"]
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
        names.append(f"a{i}")
    density = method.parameters.get("density")

    def run() -> str:
        model.add_weighted_adapter(names, weights, "merged", combination_type=method.name, density=density)
        return "merged"

    def reset() -> None:
        model.delete_adapter("merged")

    def lora_layers():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "merged" in module.lora_A:
                yield name.removeprefix(PEFT_PREFIX), module

    def collect(_: str) -> tuple[dict[str, torch.Tensor], list[int], float]:
        deltas, ranks, trunc = {}, [], float("nan")
        for name, layer in lora_layers():
            deltas[name] = layer.get_delta_weight("merged").double()
            ranks.append(layer.lora_A["merged"].weight.shape[0])
        if method.name == "ties_svd":  # PEFT's own dense TIES (deterministic) against its SVD output
            errs = []
            for name, layer in lora_layers():
                own = ties([layer.get_delta_weight(a) for a in names], torch.tensor(weights), density, "total")
                errs.append(float(torch.linalg.norm(deltas[name] - own.double()) / torch.linalg.norm(own.double())))
            trunc = max(errs)
        elif method.name == "cat":
            trunc = 0.0
        return deltas, ranks, trunc

    return run, reset, collect


WARMUP_SHAPE = (1024, 512)  # more than 4 * 65536 entries, so it takes the same code paths as a real module


def warm_up(method: Method, n: int) -> None:
    """Run the method once on a small module so that code paged in on first use is not counted as merge memory."""
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = WARMUP_SHAPE
    if method.side == "loramerge":
        from loramerge import LoraFactors, RankPolicy, get_method
        from loramerge.core.factored import compress_dense, compress_factored
        from loramerge.merging.methods import Dense, ModuleInputs

        factors = tuple(LoraFactors(A=torch.randn(RANK, d_in, generator=gen), B=torch.randn(d_out, RANK, generator=gen))
                        for _ in range(n))
        inputs = ModuleInputs(name="warm-up", factors=factors, weights=tuple(adapter_weights(n)),
                              adapter_names=tuple(f"w{i}" for i in range(n)))
        merge_method = get_method(method.name)
        result = merge_method.fn(merge_method.make_config(method.parameters), inputs)
        policy = RankPolicy.parse(method.rank)
        if isinstance(result, Dense):
            compress_dense(result.delta, policy, inputs.ranks)
        else:
            compress_factored(result.B, result.A, policy, inputs.ranks)
        return
    from peft import LoraConfig, get_peft_model

    stub = torch.nn.Module()
    stub.proj = torch.nn.Linear(d_in, d_out, bias=False)
    model = get_peft_model(stub, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False),
                           adapter_name="w0")
    for i in range(1, n):
        model.add_adapter(f"w{i}", LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False))
    model.add_weighted_adapter([f"w{i}" for i in range(n)], adapter_weights(n), "warm-up",
                               combination_type=method.name, density=method.parameters.get("density"))


def run_case(case: Case, dirs: list[str], threads: int, repeats: int, budget_s: float) -> dict[str, Any]:
    torch.set_num_threads(threads)
    method = METHODS[case.method]
    dirs = dirs[: case.n]
    weights = adapter_weights(case.n)
    warm_up(method, case.n)
    if case.side == "peft":
        run, reset, collect = _peft(method, case, dirs, weights)
    elif case.side == "loramerge":
        run, reset, collect = _loramerge_direct(method, dirs, weights)
    else:
        run, reset, collect = _loramerge_api(method, dirs, weights)
    out, times, peak_mib, live_mib = measure(run, reset, repeats, budget_s)
    deltas, ranks, trunc = collect(out)
    errors = relative_errors(deltas, reference_deltas(dirs, weights))
    return {
        "times_s": times, "time_s": min(times), "peak_extra_mib": peak_mib, "peak_live_mib": live_mib,
        "rank_min": min(ranks), "rank_max": max(ranks),
        "rel_error_max": max(errors.values()), "trunc_error_max": trunc, "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------- plan and driver


def plan(args: argparse.Namespace) -> list[Case]:
    """The quick plan: the 1B layer at N=4 for every method, then N=2 and 8 on one MLP projection for loramerge
    and PEFT's svd. The full plan: every shape, N, side and method."""
    sides: list[Side] = ["loramerge", "loramerge.merge", "peft"] if args.api else ["loramerge", "peft"]
    cases: list[Case] = []

    def add(shape: str, layers: int, targets: tuple[str, ...], n: int, keys: list[str]) -> None:
        for side in sides:
            if side == "loramerge.merge" and targets != PROJECTIONS and not args.full:
                continue  # the API rows matter for whole layers; each row costs a fresh process
            for key in keys:
                if METHODS[key].side == side.split(".")[0] and _wanted(args, shape, n, key):
                    cases.append(Case(shape, layers, targets, n, side, key))

    if args.full:
        for n in (2, 4, 8):
            add("1b", 1, PROJECTIONS, n, list(METHODS))
        for n in (2, 4, 8):
            add("8b", args.layers_8b, PROJECTIONS, n, list(METHODS))
    else:
        add("1b", 1, PROJECTIONS, 4, list(METHODS))
        for n in (2, 8):
            add("1b", 1, ONE_MLP, n, [*LORAMERGE_KEYS, "svd"])
    return cases


def _wanted(args: argparse.Namespace, shape: str, n: int, key: str) -> bool:
    return ((not args.shapes or shape in args.shapes) and (not args.n or n in args.n)
            and (not args.methods or key in args.methods))


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import peft

    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def run_worker(case: Case, dirs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run one case in a fresh interpreter (thread env set before torch starts)."""
    payload = json.dumps({"case": asdict(case), "dirs": dirs, "threads": args.threads, "repeats": args.repeats,
                          "budget_s": args.repeat_budget})
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", payload], capture_output=True, text=True,
                              env=env, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.case_timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "failed: " + " | ".join(tail)}
    result = json.loads(lines[-1][len("RESULT "):])
    result["status"] = "ok"
    result["process_s"] = time.perf_counter() - started
    return result


def _fmt_time(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_err(x: float) -> str:
    return "–" if x is None or math.isnan(x) else ("0" if x == 0 else f"{x:.2g}")


def _fmt_mib(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _largest_delta_mib(shape: Shape, targets: tuple[str, ...]) -> float:
    return max(math.prod(shape.dims(p)) for p in targets) * 4 / MIB


def results_table(rows: list[tuple[Case, dict]]) -> list[str]:
    lines = [
        "| shape | modules | N | tool | method | out rank | time | reps | peak extra RSS MiB | peak live MiB "
        "| rel. err vs Σ | trunc. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in rows:
        modules = f"{case.layers}×{len(case.targets)}" if len(case.targets) > 1 else f"{case.layers}×{case.targets[0]}"
        head = f"| {SHAPES[case.shape].name} | {modules} | {case.n} | {case.side} | {case.method} |"
        if r["status"] != "ok":
            lines.append(f"{head} | {r['status']} | | | | | |")
            continue
        rank = str(r["rank_min"]) if r["rank_min"] == r["rank_max"] else f"{r['rank_min']}–{r['rank_max']}"
        lines.append(f"{head} {rank} | {_fmt_time(r['time_s'])} | {len(r['times_s'])} | {r['peak_extra_mib']:.0f} | "
                     f"{_fmt_mib(r.get('peak_live_mib'))} | {_fmt_err(r['rel_error_max'])} | "
                     f"{_fmt_err(r['trunc_error_max'])} |")
    return lines


def _find(rows, shape, targets, n, side, method) -> dict | None:
    for case, r in rows:
        if (case.shape, case.targets, case.n, case.side, case.method) == (shape, targets, n, side, method):
            return r if r["status"] == "ok" else None
    return None


def target_checks(rows: list[tuple[Case, dict]]) -> list[str]:
    """The issue's targets, on every full 1B-shaped layer case that has both sides."""
    lines = []
    delta = _largest_delta_mib(SHAPES["1b"], PROJECTIONS)
    pairs = [("task_arithmetic/16", "svd", "factored", 1000.0, 100.0),
             ("task_arithmetic/exact", "svd", "factored", 1000.0, 100.0),
             ("ties/auto", "ties_svd", "element-wise", 10.0, 3 * delta),
             ("dare_ties/auto", "dare_ties_svd", "element-wise", 10.0, 3 * delta)]
    for n in (2, 4, 8):
        for side in ("loramerge", "loramerge.merge"):
            for ours, theirs, kind, speed_target, mem_target in pairs:
                a = _find(rows, "1b", PROJECTIONS, n, side, ours)
                b = _find(rows, "1b", PROJECTIONS, n, "peft", theirs)
                if a is None or b is None:
                    continue
                speedup = b["time_s"] / a["time_s"]
                ok_speed = "met" if speedup >= speed_target else "MISSED"
                live = a.get("peak_live_mib")
                ok_rss = "met" if a["peak_extra_mib"] < mem_target else "MISSED"
                ok_live = "–" if live is None else ("met" if live < mem_target else "MISSED")
                lines.append(
                    f"| {n} | {kind} | {side}:{ours} vs peft:{theirs} | {speedup:,.0f}× (≥ {speed_target:,.0f}×: "
                    f"{ok_speed}) | < {mem_target:.0f} MiB | {a['peak_extra_mib']:.0f} MiB ({ok_rss}) vs "
                    f"{b['peak_extra_mib']:.0f} MiB | {_fmt_mib(live)} MiB ({ok_live}) vs "
                    f"{_fmt_mib(b.get('peak_live_mib'))} MiB |")
    if not lines:
        return []
    return ["| N | kind | comparison (full 1B-shaped layer) | speed-up | memory target | peak extra RSS, ours vs PEFT "
            "| peak live heap, ours vs PEFT |",
            "|---|---|---|---|---|---|---|", *lines]


def write_markdown(path: Path, rows, env: dict, args: argparse.Namespace) -> None:
    delta = _largest_delta_mib(SHAPES["1b"], PROJECTIONS)
    text = [
        "# Merge speed and memory: loramerge vs PEFT `add_weighted_adapter`",
        "",
        f"- Command: `{env['command']}`",
        f"- Date: {env['date']}; wall time of the whole run {env['total_s'] / 60:.1f} min",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, peft {env['peft']}, "
        f"Python {env['python']}",
        f"- Threads: `torch.set_num_threads({args.threads})` (and OMP/MKL_NUM_THREADS) in every worker",
        f"- Load average (1/5/15 min) before: {env['load_before']}, after: {env['load_after']} "
        "(other jobs share this machine; times are wall-clock)",
        f"- Adapters: rank {RANK}, alpha {ALPHA}, random A ~ N(0, 1/d_in), B ~ N(0, 0.02²) (flat spectra: the worst "
        "case for truncation), all 7 projections, written by PEFT on a stub model that holds only the decoder "
        f"layers; merge weights `(0.5 + i/(N-1))/N`. TIES density 0.2, DARE density 0.5 on both sides.",
        "- Tools: `loramerge` = the method functions on `ModuleInputs` plus the rank policy, factors already in "
        "memory (as in PEFT); `loramerge.merge` = the public API, reading the adapter files; `peft` = "
        "`PeftModel.add_weighted_adapter` with its defaults (`svd_rank` = max rank = 16, `full_matrices=True`).",
        "- Time: `time.perf_counter` around the merge call, repeated (up to "
        f"{args.repeats} calls) until the calls so far took {args.repeat_budget:g} s, and the minimum is shown: "
        "PEFT's SVD merges run once, loramerge's element-wise merges 2-3 times. On this shared machine single "
        "runs of the same case varied by up to 2x between runs.",
        "- Peak extra memory: the kernel's resident high-water mark (`VmHWM`, reset through "
        "`/proc/self/clear_refs`) during the first call minus the resident size just before it, one fresh process "
        "per case. tracemalloc does not see torch's allocations and a sampling thread misses short peaks. Each "
        f"worker first runs the same method once on a small {WARMUP_SHAPE[0]}×{WARMUP_SHAPE[1]} module, so that "
        "library code paged in on first use (about 25 MiB of libtorch/MKL) is not counted; what glibc's allocator "
        "keeps resident after frees is counted.",
        "- Peak live memory: glibc `mallinfo2()` bytes in use (heap + mmapped), sampled every millisecond in a "
        "thread during the same first call, minus the value before it: what the program holds, without allocator "
        "retention or paged-in code. A lower bound (it cannot look inside one long C call, e.g. LAPACK's SVD "
        "workspace).",
        "- Errors: relative Frobenius error of the merged delta against the exact Σ wᵢ·scale·BᵢAᵢ (float64, dense, "
        "from the raw safetensors), worst module. For TIES/DARE the distance to Σ is what the method does, not a "
        "defect; `trunc. err` is the error against the method's own dense result (what the rank cut cost).",
        f"- Largest dense delta of one 1B module (8192×2048 fp32): {delta:.0f} MiB.",
        "",
        "## Results",
        "",
        *results_table(rows),
        "",
    ]
    checks = target_checks(rows)
    if checks:
        text += ["## Targets (issue 2)", "", *checks, ""]
    raw = [asdict(case) | result for case, result in rows]
    text += ["<!-- raw results (JSON), for re-plotting:", json.dumps(raw), "-->", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def write_plot(path: Path, rows, env: dict) -> None:
    """Left: time per method on one whole layer (labels: peak extra RSS). Right: time against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(c, r) for c, r in rows if r["status"] == "ok"]
    layers = [(c, r) for c, r in ok if c.targets == PROJECTIONS]
    headline = [(c, r) for c, r in layers if (c.shape, c.n) == (layers[0][0].shape, 4)] if layers else []
    headline = headline or [(c, r) for c, r in layers if (c.shape, c.n) == (layers[0][0].shape, layers[0][0].n)]
    one = [(c, r) for c, r in ok if c.targets == ONE_MLP]
    scaling = one or [(c, r) for c, r in layers if c.shape == (layers[0][0].shape if layers else "1b")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    side_colors = {"loramerge": "#2a7ab9", "loramerge.merge": "#7fb8e0", "peft": "#d0603a"}
    ax = axes[0]
    if headline:
        first = headline[0][0]
        bars = ax.bar(range(len(headline)), [r["time_s"] for _, r in headline],
                      color=[side_colors[c.side] for c, _ in headline])
        for bar, (_, r) in zip(bars, headline, strict=True):
            ax.annotate(f"{r['peak_extra_mib']:.0f} MiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(headline)), [f"{c.side}\n{c.method}" for c, _ in headline], rotation=60,
                      ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("wall time (s, log scale)")
        ax.set_title(f"{first.layers} {SHAPES[first.shape].name}-shaped layer(s), 7 projections, N={first.n}, "
                     f"rank {RANK}\n(bar labels: peak extra RSS)", fontsize=9)
    ax = axes[1]
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c, r in scaling:
        if c.side != "loramerge.merge":
            series.setdefault((c.side, c.method), []).append((c.n, r["time_s"]))
    palette = plt.get_cmap("tab10")
    for i, ((side, method), pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if side == "loramerge" else "--s", color=palette(i),
                label=f"{side}: {method}")
    where = f"one {ONE_MLP[0]} ({' x '.join(map(str, SHAPES['1b'].dims(ONE_MLP[0])))})" if one else "whole layer"
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of adapters N")
    ax.set_ylabel("wall time (s, log scale)")
    ax.set_title(f"time against N, {where}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"loramerge vs PEFT add_weighted_adapter: {env['cpu']}, {env['threads']} thread(s), "
                 f"torch {env['torch']}, peft {env['peft']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: 1B layer at N=4, plus N=2,8 on up_proj")
    mode.add_argument("--full", action="store_true", help="1B and 8B layers, N=2,4,8, every method (hours)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="at most this many calls per case (the minimum is shown)")
    p.add_argument("--repeat-budget", type=float, default=20.0,
                   help="no further repeat once the calls so far took this many seconds (so PEFT's SVDs run once)")
    p.add_argument("--layers-8b", type=int, default=2, help="8B-shaped layers in --full (default 2)")
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="only these shapes")
    p.add_argument("--n", nargs="*", type=int, help="only these adapter counts")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), help="only these method keys")
    p.add_argument("--no-api", dest="api", action="store_false", help="skip the loramerge.merge (file-reading) rows")
    p.add_argument("--case-timeout", type=float, default=3600.0, help="seconds before a case is killed")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the stub base has no hub id; keep PEFT from looking it up
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    if args.worker:
        job = json.loads(args.worker)
        c = job["case"]
        case = Case(c["shape"], c["layers"], tuple(c["targets"]), c["n"], c["side"], c["method"])
        result = run_case(case, job["dirs"], job["threads"], job["repeats"], job["budget_s"])
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    torch.set_num_threads(args.threads)
    cases = plan(args)
    env = machine() | {
        "threads": args.threads,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([".venv/bin/python", "benchmarks/merge_speed.py", *map(shlex.quote, argv)]),
        "load_before": "/".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    started = time.perf_counter()
    rows: list[tuple[Case, dict]] = []
    with tempfile.TemporaryDirectory(prefix="merge_speed_") as tmp:
        sets: dict[tuple[str, int, tuple[str, ...]], list[str]] = {}
        for case in cases:
            key = (case.shape, case.layers, case.targets)
            if key not in sets:
                count = max(c.n for c in cases if (c.shape, c.layers, c.targets) == key)
                sets[key] = write_adapters(case.shape, case.layers, case.targets, count, Path(tmp))
        for i, case in enumerate(cases, start=1):
            print(f"[{i}/{len(cases)}] {case.label} ...", end=" ", file=sys.stderr, flush=True)
            result = run_worker(case, sets[(case.shape, case.layers, case.targets)], args)
            rows.append((case, result))
            if result["status"] == "ok":
                print(f"{_fmt_time(result['time_s'])}, {result['peak_extra_mib']:.0f} MiB, "
                      f"err {_fmt_err(result['rel_error_max'])}", file=sys.stderr, flush=True)
            else:
                print(result["status"], file=sys.stderr, flush=True)
    env["load_after"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    env["total_s"] = time.perf_counter() - started
    write_markdown(args.markdown, rows, env, args)
    write_plot(args.plot, rows, env)
    print("\n".join(results_table(rows)))
    print("\n".join(target_checks(rows)))
    print(f"wrote {args.markdown} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
