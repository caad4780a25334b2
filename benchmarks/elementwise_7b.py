"""Element-wise merges on a Llama-2-7B-shaped adapter set (N=8, rank 16, all 7 projections), dense space and
core space, with PEFT's ``ties_svd`` on a sample, in one run.

The full set is 32 layers x 7 projections = 224 modules (hidden 4096, intermediate 11008, no GQA). Adapters
are written by PEFT's ``save_pretrained`` on a stub model holding only the decoder layers (as
``merge_speed.py`` does: random A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), alpha 32), for ``--layers`` layers (default
1: every layer of Llama-2-7B has the same shapes, so the full run is 32 times one layer's work; the script says
so and extrapolates). Each method runs in a fresh subprocess through the public API (``loramerge.merge`` on the
adapter directories: reading, merging, the rank policy, writing) with ``torch.set_num_threads(--threads)``;
reported: wall time, process CPU time, peak extra resident memory (VmHWM after ``clear_refs``, minus the RSS
before), the worst relative truncation error, and for core space its distance to the dense-space result.

PEFT: ``add_weighted_adapter(combination_type="ties_svd")`` on ``--peft-modules`` (default: one 4096 x 4096
``q_proj``), extrapolated to the full set by the number of entries (its cost is dominated by a full SVD per
module, which grows faster than the entries on the larger MLP modules, so the extrapolation is a lower bound).

Usage::

    .venv/bin/python benchmarks/elementwise_7b.py                  # one layer, N=8; ~15 min on a loaded 2-core box
    .venv/bin/python benchmarks/elementwise_7b.py --layers 32      # the whole set (disk: 8 x 160 MB)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_speed import PROJECTIONS, Shape, adapter_weights, build_stub  # noqa: E402

LLAMA2_7B = Shape("Llama-2-7B", hidden=4096, intermediate=11008, kv=4096)
FULL_LAYERS = 32
N = 8
RANK = 16
METHODS = {
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "della": {},
    "breadcrumbs": {},
}


def write_adapters(root: Path, layers: int, n: int, targets: tuple[str, ...] = PROJECTIONS) -> list[str]:
    import math

    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        model = build_stub(LLAMA2_7B, layers, targets)
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=list(targets)))
        gen = torch.Generator().manual_seed(1000 * i + 7)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = "stub-Llama-2-7B"
        out = root / f"a{i}"
        peft_model.save_pretrained(str(out))
        dirs.append(str(out))
        del peft_model, model
    return dirs


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(spec: dict) -> dict:
    """One merge in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    from loramerge import merge

    weights = adapter_weights(len(spec["dirs"]))
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = merge(adapters=spec["dirs"], weights=weights, method=spec["method"], parameters=spec["parameters"],
                   space=spec["space"], seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (_kib("VmHWM") - before) / 1024
    from loramerge.core import processes

    workers = processes.started  # the worker processes (if any) have exited: their peak RSS and CPU time count
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"wall": wall, "cpu": cpu + children.ru_utime + children.ru_stime, "peak_mib": peak,
           "workers": workers, "worker_peak_rss_mib": children.ru_maxrss / 1024,
           "peak_total_mib": peak + workers * children.ru_maxrss / 1024,
           "max_trunc": result.max_rel_error, "modules": len(result.modules)}
    if spec.get("save"):
        torch.save({m.name: (m.B, m.A) for m in result.modules}, spec["save"])
    return out


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=spec.get("timeout", 3600), env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
                                                                   "MKL_NUM_THREADS": str(spec["threads"])})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peft_ties_svd(dirs: list[str], targets: tuple[str, ...], threads: int) -> dict:
    """PEFT's ties_svd on one layer restricted to ``targets`` (fresh process)."""
    code = f"""
import json, os, time, sys, torch
sys.path.insert(0, {str(HERE)!r})
torch.set_num_threads({threads})
os.environ["HF_HUB_OFFLINE"] = "1"
from peft import PeftModel
from merge_speed import adapter_weights, build_stub
from elementwise_7b import LLAMA2_7B
dirs = {dirs!r}
model = PeftModel.from_pretrained(build_stub(LLAMA2_7B, 1, {targets!r}), dirs[0], adapter_name="a0")
for i, d in enumerate(dirs[1:], start=1):
    model.load_adapter(d, adapter_name=f"a{{i}}")
names = [f"a{{i}}" for i in range(len(dirs))]
wall, cpu = time.perf_counter(), time.process_time()
model.add_weighted_adapter(names, adapter_weights(len(dirs)), "merged", combination_type="ties_svd", density=0.2)
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def entries(targets: tuple[str, ...]) -> int:
    return sum(LLAMA2_7B.dims(p)[0] * LLAMA2_7B.dims(p)[1] for p in targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--spaces", nargs="+", default=["dense", "core"])
    parser.add_argument("--peft-modules", nargs="*", default=["q_proj"], help="PEFT ties_svd sample (none: skip)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    scale = FULL_LAYERS / args.layers
    rows = []
    with tempfile.TemporaryDirectory(prefix="ew7b-") as tmp:
        t0 = time.perf_counter()
        dirs = write_adapters(Path(tmp), args.layers, N)
        print(f"wrote {N} adapters of {args.layers} layer(s) in {time.perf_counter() - t0:.0f} s", flush=True)
        for method in args.methods:
            saved = {}
            for space in args.spaces:
                if space == "core" and method == "della":
                    continue  # DELLA is not offered in core space
                save = str(Path(tmp) / f"{method}-{space}.pt")
                r = run_worker({"dirs": dirs, "method": method, "parameters": METHODS[method], "space": space,
                                "threads": args.threads, "save": save})
                saved[space] = save
                r.update(method=method, space=space)
                rows.append(r)
                print(json.dumps(r), flush=True)
            if {"dense", "core"} <= set(saved):
                dense, core = torch.load(saved["dense"]), torch.load(saved["core"])
                dist = max(float(torch.linalg.norm(core[m][0] @ core[m][1] - dense[m][0] @ dense[m][1])
                                 / torch.linalg.norm(dense[m][0] @ dense[m][1])) for m in dense)
                rows[-1]["dist_to_dense"] = dist
        peft = None
        if args.peft_modules:
            targets = tuple(args.peft_modules)
            peft = peft_ties_svd(dirs[:N], targets, args.threads)
            peft["extrapolated_wall"] = peft["wall"] * entries(PROJECTIONS) * FULL_LAYERS / entries(targets)
            peft["targets"] = targets
            print(json.dumps(peft), flush=True)
    load_after = os.getloadavg()
    print(f"\nCommand: python benchmarks/elementwise_7b.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)}. Measured on {args.layers} of {FULL_LAYERS} layers "
          f"({7 * args.layers} modules); full-set numbers are x{scale:g}.\n")
    print("| method | space | wall, measured | CPU s, measured | full set (224 modules), wall | full set, CPU s | "
          "peak extra RSS MiB | worker processes x their peak RSS MiB | worst trunc. err | core vs dense rel. dist |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dist = f"{r['dist_to_dense']:.2f}" if "dist_to_dense" in r else "–"
        print(f"| {r['method']} | {r['space']} | {r['wall']:.1f} s | {r['cpu']:.1f} | {r['wall'] * scale / 60:.1f} min | "
              f"{r['cpu'] * scale:.0f} | {r['peak_mib']:.0f} | {r.get('workers', 0)} x {r.get('worker_peak_rss_mib', 0):.0f} | "
              f"{r['max_trunc']:.2f} | {dist} |")
    if peft:
        print(f"| peft ties_svd | dense | {peft['wall']:.1f} s on {'+'.join(peft['targets'])} | {peft['cpu']:.1f} | "
              f"{peft['extrapolated_wall'] / 60:.0f} min (by entries) | – | – | – | – | – |")
    return 0




def per_module(methods: list[str], spaces: list[str]) -> None:
    """In-memory factors (the same distributions), one q_proj-shaped (4096 x 4096), one up_proj-shaped
    (11008 x 4096) and one down_proj-shaped (4096 x 11008) module per case, 1 thread; process CPU seconds (robust
    to other load on a shared machine), peak extra RSS; the full set is 32 x (4 x q + 2 x up + 1 x down)."""
    import math

    from loramerge.core.adapter import LoraFactors
    from loramerge.core.factored import RankPolicy, compress_dense, compress_factored
    from loramerge.merging.methods import Dense, ModuleInputs, get_method
    from loramerge.merging.methods.core_space import method_function

    torch.set_num_threads(1)
    weights = tuple(adapter_weights(N))
    print("| method | space | q_proj CPU s | up_proj CPU s | down_proj CPU s | full set CPU s (1 core) | full set, 1 core | "
          "peak extra RSS MiB | trunc. err (down_proj) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in methods:
        for space in spaces:
            if space == "core" and method == "della":
                continue
            spec = get_method(method)
            cfg = spec.make_config(METHODS.get(method, {}))
            fn = method_function(spec, space)
            times, peak, err = [], 0.0, float("nan")
            for d_out, d_in in ((4096, 4096), (11008, 4096), (4096, 11008)):
                gen = torch.Generator().manual_seed(d_out)
                factors = tuple(LoraFactors(A=torch.randn(RANK, d_in, generator=gen) / math.sqrt(d_in),
                                            B=torch.randn(d_out, RANK, generator=gen) * 0.02) for _ in range(N))
                inputs = ModuleInputs(name="layers.0.mlp.up_proj", factors=factors, weights=weights,
                                      adapter_names=tuple(f"a{i}" for i in range(N)))
                Path("/proc/self/clear_refs").write_text("5")
                before = _kib("VmRSS")
                cpu = time.process_time()
                result = fn(cfg, inputs)
                if isinstance(result, Dense):
                    out = compress_dense(result.delta, RankPolicy("auto"), inputs.ranks, basis=result.basis)
                else:
                    out = compress_factored(result.B, result.A, RankPolicy("auto"), inputs.ranks)
                times.append(time.process_time() - cpu)
                peak = max(peak, (_kib("VmHWM") - before) / 1024)
                err = out.rel_error
                del result, out, factors, inputs
            full = FULL_LAYERS * (4 * times[0] + 2 * times[1] + times[2])
            print(f"| {method} | {space} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | {full:.0f} | "
                  f"{full / 60:.1f} min | {peak:.0f} | {err:.2f} |", flush=True)


def peft_sample(targets: tuple[str, ...] = ("q_proj",)) -> None:
    """PEFT's ties_svd on one layer's ``targets`` (adapters written by PEFT for those modules only)."""
    with tempfile.TemporaryDirectory(prefix="ew7b-peft-") as tmp:
        dirs = write_adapters(Path(tmp), 1, N, targets)
        r = peft_ties_svd(dirs, targets, 1)
    full = r["cpu"] * entries(PROJECTIONS) * FULL_LAYERS / entries(targets)
    print(json.dumps({**r, "targets": targets, "full_set_cpu_s_by_entries": full}), flush=True)


if __name__ == "__main__" and "--peft-sample" in sys.argv:
    peft_sample()
elif __name__ == "__main__" and "--per-module" in sys.argv:
    chosen = sys.argv[sys.argv.index("--per-module") + 1:]  # optional method names
    per_module(chosen or ["task_arithmetic", *METHODS], ["dense", "core"])
elif __name__ == "__main__":
    raise SystemExit(main())
