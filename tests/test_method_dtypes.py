"""Every data-free merge method keeps its inputs' dtype (float64 in, float64 out: no tensor created in a default
dtype or on a default device), in dense space and, where offered, in core space."""

from __future__ import annotations

import pytest
import torch

from loramerge.core.adapter import LoraFactors
from loramerge.merging.methods import REGISTRY, Dense, ModuleInputs
from loramerge.merging.methods.core_space import CORE_SPACE_METHODS, in_core_space

DATA_FREE = sorted(name for name, m in REGISTRY.items() if m.data == "none")


def make_inputs() -> ModuleInputs:
    g = torch.Generator().manual_seed(0)
    factors = tuple(
        LoraFactors(A=torch.randn(r, 20, generator=g, dtype=torch.float64),
                    B=torch.randn(24, r, generator=g, dtype=torch.float64) * 0.3)
        for r in (2, 3, 4)
    )
    return ModuleInputs(name="layers.0.q_proj", factors=factors, weights=(1.0, 0.6, -0.8), adapter_names=("a", "b", "c"))


@pytest.mark.parametrize("name", DATA_FREE)
def test_float64_in_float64_out(name):
    method = REGISTRY[name]
    cfg = method.make_config({})
    inputs = make_inputs()
    if method.prepare is not None:
        inputs = ModuleInputs(**{**vars(inputs), "context": method.prepare(cfg, lambda: iter([inputs]))})
    spaces = [method.fn] + ([in_core_space(method.fn)] if name in CORE_SPACE_METHODS else [])
    for fn in spaces:
        result = fn(cfg, inputs)
        tensors = [result.delta] if isinstance(result, Dense) else [result.B, result.A]
        for t in tensors:
            assert t.dtype == torch.float64 and t.device.type == "cpu" and bool(torch.isfinite(t).all())
