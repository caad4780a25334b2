"""benchmarks/gpu.py end to end in its tiny CPU configuration (the reference backend; the vLLM backend runs
where vLLM is installed): every section produces its numbers, and the merges and compositions are sane."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def test_gpu_script_tiny_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--device", "cpu", "--backend", "peft", "--threads", "1",
                        "--json", str(tmp_path / "out.json")])
    merges = [r for r in rows if r["section"] == "merge"]
    assert {(r["method"], r["space"]) for r in merges} == {("task_arithmetic", "dense"), ("ties", "dense"),
                                                          ("ties", "core")}
    assert all(r["modules"] == 7 and r["seconds"] > 0 for r in merges)
    assert next(r for r in merges if r["method"] == "task_arithmetic")["max_trunc_err"] == 0.0
    compose = {r["case"]: r for r in rows if r["section"] == "compose"}
    assert compose["cached"]["p50_ms"] < compose["cold"]["p50_ms"]
    serve = [r for r in rows if r["section"] == "serve" and "ratio" in r]
    assert len(serve) == 1 and serve[0]["static_tokens_per_s"] > 0 and serve[0]["mixture_tokens_per_s"] > 0
    assert (tmp_path / "out.json").is_file()
