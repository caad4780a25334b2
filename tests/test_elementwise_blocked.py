"""The blocked element-wise merges on modules of several row blocks (and past the sampled-threshold size),
against the same independent dense oracles as tests/test_core_methods.py."""

from __future__ import annotations

import pytest
import torch
from test_core_methods import (
    ref_breadcrumbs,
    ref_dare_masks,
    ref_elect_and_merge,
    ref_magprune,
    ref_trim,
    run,
    task_vectors,
)

from loramerge.core.adapter import LoraFactors
from loramerge.core.ops import BLOCK_ELEMENTS, kth_smallest_abs_of_product, row_blocks
from loramerge.core.streams import UniformStream
from loramerge.merging.methods import ModuleInputs

SHAPE = (530, 600)  # 318,000 entries: 3 row blocks, and above the size where thresholds are sampled


def make_inputs(dtype=torch.float64, weights=(1.0, -0.6, 0.8)) -> ModuleInputs:
    g = torch.Generator().manual_seed(5)
    factors = tuple(
        LoraFactors(A=torch.randn(r, SHAPE[1], generator=g, dtype=dtype),
                    B=torch.randn(SHAPE[0], r, generator=g, dtype=dtype) * 0.3)
        for r in (3, 4, 5)
    )
    return ModuleInputs(name="layers.0.up_proj", factors=factors, weights=weights, adapter_names=("a", "b", "c"), seed=3)


def test_the_shape_spans_several_blocks():
    assert len(row_blocks(*SHAPE)) >= 3 and SHAPE[0] * SHAPE[1] > 2 * BLOCK_ELEMENTS


def test_order_statistics_of_a_product_are_exact():
    f = make_inputs().factors[0]
    full = (f.B @ f.A).abs().flatten()
    ranks = [1, 17, 200_000, full.numel()]
    expected = [float(torch.kthvalue(full, r).values) for r in ranks]
    assert kth_smallest_abs_of_product(f.B, f.A, ranks) == expected


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
def test_ties(merge_func):
    inputs = make_inputs()
    trimmed = torch.stack([ref_trim(t, 0.2) for t in task_vectors(inputs)])
    expected = 0.9 * ref_elect_and_merge(trimmed, merge_func)
    got = run("ties", inputs, density=0.2, merge_func=merge_func, **{"lambda": 0.9})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dare_linear_and_dare_ties():
    inputs = make_inputs()
    masks = ref_dare_masks(inputs, 0.4)
    dropped = torch.stack([m * t / 0.4 for m, t in zip(masks, task_vectors(inputs))])
    torch.testing.assert_close(run("dare_linear", inputs, density=0.4), dropped.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("dare_ties", inputs, density=0.4), ref_elect_and_merge(dropped),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("elect", [True, False])
def test_della(elect):
    inputs = make_inputs(torch.float32)
    pruned = torch.stack([
        ref_magprune(t, 0.7, 0.1, UniformStream.for_parts(inputs.seed, "della", inputs.name, n))
        for t, n in zip(task_vectors(inputs), inputs.adapter_names)
    ])
    expected = ref_elect_and_merge(pruned, weights=inputs.weights) if elect else pruned.sum(0)
    got = run("della", inputs, density=0.7, epsilon=0.1, elect_sign=elect)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sign_election", [False, True])
def test_breadcrumbs_and_magnitude_prune(sign_election):
    inputs = make_inputs()
    masked = torch.stack([ref_breadcrumbs(t, 0.3, 0.05) for t in task_vectors(inputs)])
    expected = ref_elect_and_merge(masked) if sign_election else masked.sum(0)
    got = run("breadcrumbs", inputs, density=0.3, gamma=0.05, sign_election=sign_election)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    pruned = sum(ref_trim(t, 0.25) for t in task_vectors(inputs))
    torch.testing.assert_close(run("magnitude_prune", inputs, density=0.25), pruned, rtol=1e-12, atol=1e-12)


def test_exact_cancellation_takes_the_sign_of_the_total():
    """Two opposite task vectors: every entry's mass cancels exactly, in every block, so every entry takes the
    sign of the whole mass's sum (zero, hence +): the result is |tau|."""
    f0 = make_inputs().factors[0]
    cancel = ModuleInputs(name="m", factors=(f0, LoraFactors(A=f0.A, B=-f0.B)), weights=(1.0, 1.0),
                          adapter_names=("a", "b"))
    got = run("ties", cancel, density=1.0)
    torch.testing.assert_close(got, ref_elect_and_merge(task_vectors(cancel)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, (f0.B @ f0.A).abs(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.2}), ("dare_ties", {"density": 0.4}), ("dare_linear", {"density": 0.4}),
    ("della", {"elect_sign": True}), ("della", {"elect_sign": False}), ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs", {"sign_election": True}), ("magnitude_prune", {"density": 0.25}),
])
def test_the_number_of_workers_does_not_change_the_result(method, params):
    """The blocked passes share the adapters of a block, then the pieces of a block, among torch's intra-op
    threads: bit for bit the same result (and the same random streams) with 1, 2 or 3 workers."""
    inputs = make_inputs(torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for workers in (1, 2, 3):
            torch.set_num_threads(workers)
            results.append(run(method, inputs, **params))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert results[0].abs().sum() > 0
