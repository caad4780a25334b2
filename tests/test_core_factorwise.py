"""factorwise: true reproduces PEFT's add_weighted_adapter for the factor-wise combination types."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

from loramerge import load_adapter, merge
from loramerge.core.ops import derive_seed

WEIGHTS = [0.7, 0.4, 1.2]


def peft_merged_deltas(base, paths, combination_type, density=None):
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(p, adapter_name=f"a{i}")
    kwargs = {"density": density} if density is not None else {}
    model.add_weighted_adapter([f"a{i}" for i in range(len(paths))], WEIGHTS, "merged",
                               combination_type=combination_type, **kwargs)
    return {name: m.get_delta_weight("merged").detach()
            for name, m in model.base_model.model.named_modules() if "merged" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("peft_type,method,params", [
    ("linear", "task_arithmetic", {}),
    ("ties", "ties", {"density": 0.5}),
    ("magnitude_prune", "magnitude_prune", {"density": 0.5}),
])
def test_factorwise_equals_peft(llama, equal_rank_adapters, peft_type, method, params):
    expected = peft_merged_deltas(llama, equal_rank_adapters, peft_type, params.get("density"))
    result = merge(adapters=equal_rank_adapters, method=method, weights=WEIGHTS, parameters=params, factorwise=True)
    got = result.factors()
    assert set(got) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(got[name].delta(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft_fn,method", [(merge_utils.dare_linear, "dare_linear"), (merge_utils.dare_ties, "dare_ties")])
def test_factorwise_dare_equals_peft_merge_utils(equal_rank_adapters, peft_fn, method):
    """PEFT draws DARE masks from the global RNG in module order; with the same seed per module we match it."""
    result = merge(adapters=equal_rank_adapters, method=method, weights=WEIGHTS, parameters={"density": 0.6},
                   factorwise=True, seed=5).factors()
    adapters = [load_adapter(p) for p in equal_rank_adapters]
    for name in adapters[0].modules:
        fs = [a.factors(name) for a in adapters]
        ws = [w * f.scale for w, f in zip(WEIGHTS, fs)]
        w_a = torch.tensor([(abs(x) ** 0.5) * (1 if x >= 0 else -1) for x in ws])
        w_b = torch.tensor([abs(x) ** 0.5 for x in ws])
        torch.manual_seed(derive_seed(5, "factorwise", name))
        A = peft_fn([f.A for f in fs], w_a, 0.6)
        B = peft_fn([f.B / f.scale for f in fs], w_b, 0.6)
        torch.testing.assert_close(result[name].delta(), B @ A, rtol=1e-5, atol=1e-6)


def test_factorwise_is_not_the_weighted_sum(equal_rank_adapters):
    """The reason it is opt-in: factor averaging adds cross terms B_i A_j."""
    exact = merge(adapters=equal_rank_adapters, method="task_arithmetic", weights=WEIGHTS).factors()
    approx = merge(adapters=equal_rank_adapters, method="task_arithmetic", weights=WEIGHTS, factorwise=True).factors()
    name = next(iter(exact))
    err = torch.linalg.norm(exact[name].delta() - approx[name].delta()) / torch.linalg.norm(exact[name].delta())
    assert err > 0.3


def test_factorwise_refuses_mixed_ranks(three_adapters):
    from loramerge.errors import RecipeError

    with pytest.raises(RecipeError, match="equal ranks"):
        merge(adapters=three_adapters, method="ties", factorwise=True)


def test_factorwise_is_refused_for_methods_without_a_peft_variant(equal_rank_adapters):
    from loramerge.errors import RecipeError

    with pytest.raises(RecipeError, match="no factorwise"):
        merge(adapters=equal_rank_adapters, method="della", factorwise=True)
