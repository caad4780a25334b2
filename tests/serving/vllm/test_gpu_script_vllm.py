"""benchmarks/gpu.py's vLLM path, end to end on CPU in its tiny configuration: the serving section runs the
same per-request mixtures and pre-merged static LoRAs through real vLLM that a GPU run measures, so the
prepared GPU script is known to work before a GPU is lent (tests/test_gpu_script.py covers the other backend)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu.py"


def test_gpu_script_serve_section_on_vllm_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench_vllm", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench_vllm"] = module
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--device", "cpu", "--backend", "vllm", "--sections", "serve", "--threads", "1",
                        "--json", str(tmp_path / "out.json")])
    runs = [r for r in rows if r["section"] == "serve" and "case" in r]
    assert [r["case"] for r in runs] == ["static", "mixture", "static", "mixture"]
    assert all(r["backend"] == "vllm" for r in runs)
    # every request generated its tokens (4 each, ignore_eos) through vLLM, static and composed alike
    assert all(r["tokens"] == 4 * 4 for r in runs), runs
    summary = next(r for r in rows if r["section"] == "serve" and "ratio" in r)
    assert summary["static_tokens_per_s"] > 0 and summary["mixture_tokens_per_s"] > 0
