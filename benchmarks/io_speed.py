"""Exact merges against raw safetensors I/O of the same bytes, in the same run.

Adapter sets (random factors, written with ``safetensors.torch.save_file`` under PEFT's key names, with a PEFT
``adapter_config.json``):

- ``smollm2``: 4 rank-8 adapters shaped like SmolLM2-135M (30 layers x 7 projections = 210 modules; hidden 576,
  intermediate 1536, k/v 192), the shape of the real adapters in the quality benchmark;
- ``synthetic-M``: 2 rank-8 adapters of M modules each (256 x 256 linear layers), M = 750, 1,500, 3,000, to show
  how the cost grows with the module count.

Per set, measured in one process, alternating so that both sides see the same machine load:

- ``raw``: ``safetensors.torch.load_file`` of every input (one open each) plus one ``save_file`` of all their
  tensors: the same bytes read and written once, no checks;
- ``task_arithmetic/exact`` and ``cat``: ``loramerge.merge(..., output=...)``, i.e. open, validate, merge,
  write the PEFT adapter atomically (config, card and manifest included).

The minimum over ``--repeats`` runs is reported (the page cache is warm for both sides).

Usage::

    .venv/bin/python benchmarks/io_speed.py                 # about 1-2 minutes on 2 cores
    .venv/bin/python benchmarks/io_speed.py --sets smollm2 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_modules() -> dict[str, tuple[int, int]]:
    h, i, kv = 576, 1536, 192
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {}
    for layer in range(30):
        for p in PROJ:
            parent = "self_attn" if p in PROJ[:4] else "mlp"
            out[f"model.layers.{layer}.{parent}.{p}"] = dims[p]
    return out


def synthetic_modules(count: int, d: int = 256) -> dict[str, tuple[int, int]]:
    return {f"model.blocks.{i}.proj": (d, d) for i in range(count)}


def write_set(root: Path, modules: dict[str, tuple[int, int]], n: int, rank: int = 8) -> list[Path]:
    from safetensors.torch import save_file

    dirs = []
    for t in range(n):
        gen = torch.Generator().manual_seed(100 + t)
        tensors = {}
        for name, (d_out, d_in) in modules.items():
            prefix = "base_model.model." + name
            tensors[prefix + ".lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
            tensors[prefix + ".lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
        out = root / f"adapter-{t}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": "stub",
                  "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules}), "bias": "none",
                  "task_type": "CAUSAL_LM"}
        (out / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(out)
    return dirs


def raw_io(dirs: list[Path], out: Path) -> float:
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    merged = {}
    for t, d in enumerate(dirs):
        for key, value in load_file(str(d / "adapter_model.safetensors")).items():
            merged[f"{t}.{key}"] = value
    save_file(merged, str(out), metadata={"format": "pt"})
    return time.perf_counter() - start


def loramerge_run(dirs: list[Path], out: Path, method: str) -> float:
    from loramerge import merge

    start = time.perf_counter()
    kwargs = {"rank": "exact"} if method == "task_arithmetic" else {}
    merge(adapters=[str(d) for d in dirs], method=method, output=str(out), force=True, **kwargs)
    return time.perf_counter() - start


def measure(name: str, modules: dict[str, tuple[int, int]], n: int, repeats: int, tmp: Path) -> dict:
    root = tmp / name
    dirs = write_set(root, modules, n)
    in_bytes = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
    times: dict[str, list[float]] = {"raw": [], "task_arithmetic/exact": [], "cat": []}
    loramerge_run(dirs, root / "warm", "task_arithmetic")  # imports and first-call costs, not counted
    for _ in range(repeats):
        times["raw"].append(raw_io(dirs, root / "raw.safetensors"))
        times["task_arithmetic/exact"].append(loramerge_run(dirs, root / "ta", "task_arithmetic"))
        times["cat"].append(loramerge_run(dirs, root / "cat", "cat"))
    shutil.rmtree(root)
    best = {k: min(v) for k, v in times.items()}
    return {"set": name, "modules": len(modules), "n": n, "mib": in_bytes / 2**20, "times": best,
            "ratios": {k: best[k] / best["raw"] for k in best if k != "raw"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["smollm2", "synthetic-750", "synthetic-1500", "synthetic-3000"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    with tempfile.TemporaryDirectory(prefix="io_speed-") as tmp:
        for name in args.sets:
            if name == "smollm2":
                row = measure(name, smollm2_modules(), 4, args.repeats, Path(tmp))
            else:
                row = measure(name, synthetic_modules(int(name.split("-")[1])), 2, args.repeats, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    print(f"\nCommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s); load average before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}\n")
    print("| set | modules x N | input MiB | raw read+write | task_arithmetic/exact | ratio | cat | ratio | "
          "ta per module-adapter |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["times"]
        per = t["task_arithmetic/exact"] / (r["modules"] * r["n"]) * 1e3
        print(f"| {r['set']} | {r['modules']} x {r['n']} | {r['mib']:.1f} | {t['raw'] * 1e3:.0f} ms | "
              f"{t['task_arithmetic/exact'] * 1e3:.0f} ms | {r['ratios']['task_arithmetic/exact']:.2f}x | "
              f"{t['cat'] * 1e3:.0f} ms | {r['ratios']['cat']:.2f}x | {per:.3f} ms |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
