"""Large CPU element-wise merges run their modules in worker processes (core/processes.py): the same merge as in
one process, the modules in order, and a module that fails in a worker fails with the full error here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loramerge import merge
from loramerge.core import processes
from loramerge.core.processes import ordered_map
from loramerge.errors import NumericalError
from loramerge.merging import engine


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_the_order_with_a_small_window():
    assert list(ordered_map(_square, range(7), workers=2, ahead=2)) == [x * x for x in range(7)]
    assert list(ordered_map(_square, iter([3, 1]), workers=1)) == [9, 1]


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("print('top level ran', flush=True)\n"
                      "from loramerge.core.processes import ordered_map\n"
                      "print(list(ordered_map(abs, [-1, -2, 3], workers=2)))\n"
                      "import sys; print(sys.modules['__main__'].__file__)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines() == ["top level ran", "[1, 2, 3]", str(script)]


@pytest.fixture
def in_processes(monkeypatch):
    """Every element-wise merge of the tiny models goes through two worker processes."""
    monkeypatch.setattr(engine, "PROCESS_MIN_ENTRIES", 1)
    monkeypatch.setenv("LORAMERGE_PROCESSES", "2")


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}),
                                           ("della", {}), ("breadcrumbs", {"density": 0.5, "gamma": 0.05})])
def test_worker_processes_give_the_same_merge(three_adapters, in_processes, monkeypatch, method, params):
    monkeypatch.setenv("LORAMERGE_PROCESSES", "1")
    here = merge(adapters=three_adapters, method=method, parameters=params, weights=[1.0, 0.7, 0.5])
    assert engine._process_workers(here.adapter_set, here_plan(here), list(here.adapter_set.module_names),
                                   "cpu") == 1
    monkeypatch.setenv("LORAMERGE_PROCESSES", "2")
    pooled = merge(adapters=three_adapters, method=method, parameters=params, weights=[1.0, 0.7, 0.5])
    assert engine._process_workers(pooled.adapter_set, here_plan(pooled), list(pooled.adapter_set.module_names),
                                   "cpu") == 2
    assert processes.started == 2  # the workers ran
    assert [m.name for m in pooled.modules] == [m.name for m in here.modules]
    assert [r.input_ranks for r in pooled.reports] == [r.input_ranks for r in here.reports]
    for a, b in zip(here.modules, pooled.modules):
        # one thread in the worker, torch's threads here: the same entries, GEMM round-off apart
        torch.testing.assert_close(b.B.float() @ b.A.float(), a.B.float() @ a.A.float(), rtol=1e-4, atol=1e-6)


def here_plan(result):
    return engine.MergePlan.from_recipe(result.recipe)


def test_factored_methods_and_small_merges_stay_in_this_process(three_adapters, monkeypatch):
    monkeypatch.setenv("LORAMERGE_PROCESSES", "2")
    result = merge(adapters=three_adapters, method="ties")
    names = list(result.adapter_set.module_names)
    assert engine._process_workers(result.adapter_set, here_plan(result), names, "cpu") == 1  # tiny modules
    monkeypatch.setattr(engine, "PROCESS_MIN_ENTRIES", 1)
    ta = merge(adapters=three_adapters, method="task_arithmetic")
    assert engine._process_workers(ta.adapter_set, here_plan(ta), names, "cpu") == 1  # factored: no dense work
    assert engine._process_workers(result.adapter_set, here_plan(result), names, "cpu") == 2


def test_a_module_that_fails_in_a_worker_fails_here_with_its_name(three_adapters, in_processes, tmp_path):
    named = [{"path": str(p), "name": n} for p, n in zip(three_adapters, ("huge", "b", "c"))]
    with pytest.raises(NumericalError) as err:
        merge(adapters=named, method="ties", weights=[3e38, 1.0, 1.0], output=tmp_path / "out")
    assert err.value.module and "'huge'" in str(err.value)
    assert not (tmp_path / "out").exists()
