"""basis:DIR/task and twin:DIR/task requests run the real RMM basis and Twin bundle artifacts."""

from __future__ import annotations

import torch

from loramerge.artifacts.basis import build_basis
from loramerge.artifacts.twin import build_twin, compose_twin, load_twin
from loramerge.core.adapter import load_adapter
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer


def served_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    adapter = load_adapter(adapter_dir)
    return {name: adapter.factors(name).delta().double() for name in adapter.modules}


def test_basis_and_twin_tasks_are_served_exactly(adapter_root, tmp_path):
    roots = tmp_path / "bundles"
    tasks = [adapter_root / name for name in ("code", "math", "chat")]
    build_basis(tasks, 3, roots / "lib-basis")  # k = N: every task reconstructs exactly
    build_twin(tasks, roots / "lib-twin", residual_fraction=1.0)
    composer = Composer(AdapterCatalog(roots=[roots]), cache_dir=tmp_path / "cache", device="cpu")

    built = composer.build(composer.resolve(composer.parse("basis:lib-basis/math")))
    original = load_adapter(adapter_root / "math")
    got = served_deltas(built.adapter.path)
    assert set(got) == set(original.modules)
    for name, delta in got.items():
        torch.testing.assert_close(delta, original.factors(name).delta().double(), rtol=1e-4, atol=1e-5)

    built = composer.build(composer.resolve(composer.parse("twin:lib-twin/code")))
    bundle = load_twin(roots / "lib-twin")
    expected = {m.name: (m.B @ m.A).double() for m in compose_twin(bundle, {"code": 1.0})}
    got = served_deltas(built.adapter.path)
    assert set(got) == set(expected)
    for name, delta in got.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-5)
    composer.close()
