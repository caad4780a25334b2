"""Each merge method against an independent dense implementation written from its paper.

The oracles below stack the dense task vectors and follow the papers' steps
literally; the library streams over adapters and must agree exactly (the
random methods share only the documented seeding contract: one generator per
(seed, method, module, adapter)).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loramerge.core.adapter import LoraFactors
from loramerge.core.ops import generator_for
from loramerge.core.streams import UniformStream
from loramerge.merging.methods import Dense, Factored, ModuleInputs, get_method

WEIGHTS = (1.0, 0.6, 0.8)


def make_inputs(weights=WEIGHTS, seed=0, shape=(24, 20), ranks=(3, 4, 5)) -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    factors = tuple(
        LoraFactors(A=torch.randn(r, shape[1], generator=g), B=torch.randn(shape[0], r, generator=g) * 0.3)
        for r in ranks
    )
    return ModuleInputs(name="layers.0.q_proj", factors=factors, weights=tuple(weights),
                        adapter_names=("a", "b", "c")[: len(ranks)], seed=seed)


def run(method: str, inputs: ModuleInputs, **params) -> torch.Tensor:
    spec = get_method(method)
    result = spec.fn(spec.make_config(params), inputs)
    return result.delta if isinstance(result, Dense) else result.B @ result.A


def task_vectors(inputs: ModuleInputs) -> torch.Tensor:
    return torch.stack([w * f.B @ f.A for f, w in zip(inputs.factors, inputs.weights)])


# --- independent dense references -------------------------------------------------------------

def ref_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * n) largest |entries| of one task vector."""
    flat = tau.flatten()
    k = int(density * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep.view_as(tau), tau, torch.zeros_like(tau))


def ref_elect_and_merge(trimmed: torch.Tensor, merge_func="mean", sign_rule="total", weights=None) -> torch.Tensor:
    """TIES steps 2-3: elect by mass (ties -> sign of the total), merge the agreeing entries."""
    votes = trimmed.sum(0) if sign_rule == "total" else trimmed.sign().sum(0)
    total_sign = 1.0 if float(votes.sum()) >= 0 else -1.0
    elected = torch.where(votes > 0, 1.0, torch.where(votes < 0, -1.0, total_sign))
    agree = (trimmed != 0) & (trimmed.sign() == elected)
    kept = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    if merge_func == "sum":
        return kept.sum(0)
    if merge_func == "max":
        idx = kept.abs().argmax(0, keepdim=True)
        return kept.gather(0, idx)[0]
    if weights is not None:
        w = torch.tensor(weights).abs().view(-1, 1, 1)
        return kept.sum(0) / (agree * w).sum(0).clamp(min=1e-12)
    return kept.sum(0) / agree.sum(0).clamp(min=1)


def ref_dare_masks(inputs: ModuleInputs, density: float, tag="dare") -> list[torch.Tensor]:
    masks = []
    for name, f in zip(inputs.adapter_names, inputs.factors):
        gen = generator_for(inputs.seed, tag, inputs.name, name)
        masks.append(torch.bernoulli(torch.full((f.d_out, f.d_in), density), generator=gen).bool())
    return masks


# --- tests ---------------------------------------------------------------------------------------

def test_task_arithmetic_average_and_cat_are_exact_sums():
    inputs = make_inputs()
    taus = task_vectors(inputs)
    torch.testing.assert_close(run("task_arithmetic", inputs, **{"lambda": 0.5}), 0.5 * taus.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("linear", inputs), taus.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("average", inputs), taus.sum(0) / sum(WEIGHTS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("task_arithmetic", inputs, normalize=True), taus.sum(0) / sum(WEIGHTS),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("cat", inputs), taus.sum(0), rtol=1e-5, atol=1e-5)
    assert isinstance(get_method("cat").fn(get_method("cat").make_config({}), inputs), Factored)


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("sign_rule", ["total", "frequency"])
def test_ties_matches_the_paper(merge_func, sign_rule):
    inputs = make_inputs()
    trimmed = torch.stack([ref_trim(t, 0.3) for t in task_vectors(inputs)])
    expected = 0.9 * ref_elect_and_merge(trimmed, merge_func, sign_rule)
    got = run("ties", inputs, density=0.3, merge_func=merge_func, majority_sign=sign_rule, **{"lambda": 0.9})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ties_zero_vote_takes_the_total_sign():
    """Two opposite task vectors: every vote is 0, so all entries take the sign of the total (+)."""
    f = LoraFactors(A=torch.eye(2), B=torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    g = LoraFactors(A=torch.eye(2), B=-f.B)
    inputs = ModuleInputs(name="m", factors=(f, g), weights=(1.0, 1.0), adapter_names=("a", "b"))
    got = run("ties", inputs, density=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


def test_dare_linear_matches_the_paper():
    inputs = make_inputs()
    masks = ref_dare_masks(inputs, 0.4)
    expected = sum(m * t / 0.4 for m, t in zip(masks, task_vectors(inputs)))
    torch.testing.assert_close(run("dare_linear", inputs, density=0.4), expected, rtol=1e-5, atol=1e-6)
    no_rescale = sum(m * t for m, t in zip(masks, task_vectors(inputs)))
    torch.testing.assert_close(run("dare_linear", inputs, density=0.4, rescale=False), no_rescale, rtol=1e-5, atol=1e-6)


def test_dare_ties_matches_drop_rescale_then_ties():
    inputs = make_inputs()
    masks = ref_dare_masks(inputs, 0.5)
    dropped = torch.stack([m * t / 0.5 for m, t in zip(masks, task_vectors(inputs))])
    expected = ref_elect_and_merge(dropped)
    torch.testing.assert_close(run("dare_ties", inputs, density=0.5), expected, rtol=1e-5, atol=1e-6)


def test_dare_is_seeded_and_unbiased():
    inputs = make_inputs()
    a = run("dare_linear", inputs, density=0.5)
    b = run("dare_linear", inputs, density=0.5)
    torch.testing.assert_close(a, b)
    other = run("dare_linear", replace(inputs, seed=1), density=0.5)
    assert not torch.allclose(a, other)
    # unbiased: the mean over many seeds approaches the plain sum
    total = sum(run("dare_linear", replace(inputs, seed=s), density=0.5) for s in range(300))
    expected = task_vectors(inputs).sum(0)
    assert float(torch.linalg.norm(total / 300 - expected) / torch.linalg.norm(expected)) < 0.1


def ref_magprune(tau: torch.Tensor, density: float, eps: float, stream: UniformStream) -> torch.Tensor:
    """DELLA MAGPRUNE: per row, ascending magnitude rank i -> p_i = d - eps + 2 eps i / (n - 1); entries of equal
    magnitude ranked by column (float32 products do tie now and then)."""
    n = tau.shape[1]
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1, stable=True), dim=1).float()
    probs = density - eps + 2 * eps * ranks / (n - 1)
    keep = stream.fill_(torch.empty_like(probs)) < probs  # Bernoulli(probs), drawn whole in memory order
    return torch.where(keep, tau / probs, torch.zeros_like(tau))


@pytest.mark.parametrize("elect", [True, False])
def test_della_matches_the_paper(elect):
    inputs = make_inputs()
    pruned = torch.stack([
        ref_magprune(t, 0.7, 0.1, UniformStream.for_parts(inputs.seed, "della", inputs.name, n))
        for t, n in zip(task_vectors(inputs), inputs.adapter_names)
    ])
    if elect:
        expected = 1.1 * ref_elect_and_merge(pruned, weights=inputs.weights)
    else:
        expected = 1.1 * pruned.sum(0)
    got = run("della", inputs, density=0.7, epsilon=0.1, elect_sign=elect, **{"lambda": 1.1})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def ref_breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Sort |tau| descending, drop the top gamma fraction, keep the next density fraction."""
    flat = tau.flatten()
    order = torch.argsort(flat.abs(), descending=True)
    n = flat.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[int(gamma * n): int(gamma * n) + int(density * n)]] = True
    return torch.where(keep.view_as(tau), tau, torch.zeros_like(tau))


@pytest.mark.parametrize("sign_election", [False, True])
def test_breadcrumbs_matches_the_paper(sign_election):
    inputs = make_inputs()
    masked = torch.stack([ref_breadcrumbs(t, 0.3, 0.05) for t in task_vectors(inputs)])
    expected = 0.5 * (ref_elect_and_merge(masked) if sign_election else masked.sum(0))
    got = run("breadcrumbs", inputs, density=0.3, gamma=0.05, sign_election=sign_election, **{"lambda": 0.5})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_magnitude_prune_matches_trim_then_sum():
    inputs = make_inputs()
    expected = sum(ref_trim(t, 0.25) for t in task_vectors(inputs))
    torch.testing.assert_close(run("magnitude_prune", inputs, density=0.25), expected, rtol=1e-5, atol=1e-6)


def test_density_one_keeps_everything():
    inputs = make_inputs()
    taus = task_vectors(inputs)
    torch.testing.assert_close(run("magnitude_prune", inputs, density=1.0), taus.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run("dare_linear", inputs, density=1.0), taus.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,params,message", [
    ("ties", {"density": 0.0}, "greater than 0"),
    ("ties", {"densty": 0.2}, "densty"),
    ("della", {"density": 0.95, "epsilon": 0.1}, "epsilon"),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.2}, "gamma"),
    ("ties", {"merge_func": "median"}, "merge_func"),
])
def test_bad_parameters_are_rejected(method, params, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        get_method(method).make_config(params)


@pytest.mark.parametrize("rescale", [False, True])
def test_chunked_drop_draws_the_same_mask_as_bernoulli(rescale):
    """The fast chunked DARE drop (uniform < density, chunk after chunk) equals torch.bernoulli's mask drawn
    in one piece from the same seed, across chunk boundaries; a recorded mask replays to the same values."""
    from loramerge.core.ops import CHUNK_ELEMENTS, bernoulli_mask, random_drop_, replay_drop_

    x = torch.randn(3, CHUNK_ELEMENTS // 2 + 7)  # spans 2 chunks, the last one partial
    density = 0.3
    expected = x * bernoulli_mask(x.shape, density, torch.Generator().manual_seed(5))
    if rescale:
        expected = expected / density
    record = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)
    dropped = random_drop_(x.clone(), density, torch.Generator().manual_seed(5), rescale, record=record)
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)
    torch.testing.assert_close(replay_drop_(x.clone(), record, density, rescale), expected, rtol=0, atol=0)
    assert 0.28 < float((dropped != 0).float().mean()) < 0.32


@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.9, 0.1), (0.2, 0.0), (1.0, 0.0)])
def test_breadcrumbs_band_is_the_sorted_band(density, gamma):
    """band_mask (two order statistics, no sort) keeps exactly descending ranks [gamma n, (gamma + density) n),
    also on a tensor big enough for the sampled order statistics."""
    from loramerge.core.ops import band_mask

    x = torch.randn(700, 1100, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.where(band_mask(x, density, gamma), x, torch.zeros_like(x)),
                               ref_breadcrumbs(x, density, gamma), rtol=0, atol=0)
