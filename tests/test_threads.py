"""loramerge.core.threads: tasks at once, each on one intra-op thread, the caller's settings untouched; and the
vectorised ranking and band helpers of the element-wise methods against plain torch."""

from __future__ import annotations

import threading

import pytest
import torch

from loramerge.core.ops import keep_band, magprune_keep_probs, row_order
from loramerge.core.threads import cpu_workers, parallel_map, split_range


def test_parallel_map_keeps_the_order_and_runs_each_task_on_one_thread():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = parallel_map(lambda x: (x * x, torch.get_num_threads(), threading.get_ident()), range(8), 2)
        assert [s[0] for s in seen] == [x * x for x in range(8)]
        assert {s[1] for s in seen} == {1}  # one intra-op thread per task: no nested parallelism
        assert torch.get_num_threads() == 2  # the caller's count is untouched
        fresh: list[int] = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert fresh == [2]  # threads started later still inherit the caller's count
        assert parallel_map(lambda x: threading.get_ident(), range(3), 1) == [threading.get_ident()] * 3
    finally:
        torch.set_num_threads(before)
    assert cpu_workers("meta") == 1


def test_parallel_map_passes_errors_on():
    def fail(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three"):
        parallel_map(fail, range(6), 2)


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 5), (0, 2), (7, 1)])
def test_split_range_covers_everything_once(n, parts):
    pieces = split_range(n, parts)
    assert [i for p in pieces for i in range(n)[p]] == list(range(n))
    assert len(pieces) == max(1, min(parts, n))


@pytest.mark.parametrize("shape", [(5, 1), (7, 33), (4, 1000)])
def test_row_order_is_the_stable_argsort_of_the_magnitudes(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-6, 7, shape, generator=g).float() * 0.25  # many ties, zeros of both signs
    x[0, 0] = -0.0
    x[-1, -1] = float("inf")
    expected = torch.argsort(x.abs(), dim=-1, stable=True)
    assert torch.equal(row_order(x), expected)


def test_magprune_probabilities_rank_ties_by_column():
    x = torch.tensor([[3.0, -1.0, 1.0, 0.0, 2.0]])
    probs = magprune_keep_probs(x, 0.5, 0.2)  # ranks 4, 1, 2, 0, 3 -> 0.3 + 0.1 * rank
    torch.testing.assert_close(probs, torch.tensor([[0.7, 0.4, 0.5, 0.3, 0.6]]))
    slow = magprune_keep_probs(x.double(), 0.5, 0.2)  # the argsort path (not float32)
    torch.testing.assert_close(slow, probs.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lo,hi", [(0.5, 1.5), (0.0, 1.0), (1.0, 1.0), (0.2, float("inf"))])
def test_keep_band_is_the_band_mask(dtype, lo, hi):
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(2), dtype=dtype)
    x[0, :4] = torch.tensor([lo, -lo, hi, -hi], dtype=dtype).nan_to_num(posinf=3.0)
    a = x.abs()
    expected = torch.where((a >= lo) & (a <= hi), x, torch.zeros_like(x))
    assert torch.equal(keep_band(x, lo, hi), expected)


def test_uniform_stream_is_seeded_split_independent_and_on_torch_rand_grid():
    from loramerge.core.streams import UniformStream

    whole = UniformStream(5).fill_(torch.empty(40_001))
    stream = UniformStream(5)
    parts = torch.cat([stream.fill_(torch.empty(n)) for n in (3, 20_000, 1, 19_997)])  # odd splits: spare halves
    assert torch.equal(whole, parts)
    assert torch.equal(UniformStream(5).fill_(torch.empty(40_001, dtype=torch.float64)).float(), whole)
    assert not torch.equal(UniformStream(6).fill_(torch.empty(40_001)), whole)
    assert torch.equal(UniformStream.for_parts(0, "della", "m", "a").fill_(torch.empty(9)),
                       UniformStream.for_parts(0, "della", "m", "a").fill_(torch.empty(9)))
    k = whole * 2**24
    assert torch.equal(k, k.round()) and 0 <= float(whole.min()) and float(whole.max()) < 1
    counts = torch.histc(whole, bins=10, min=0.0, max=1.0)  # uniform: 4,000 per bin, sd ~ 60
    assert float((counts - 4000).abs().max()) < 400
    assert abs(float((whole < 0.3).float().mean()) - 0.3) < 0.01
    grid = torch.empty(3, 5)
    assert UniformStream(1).fill_(grid.t()).shape == (5, 3)  # a non-contiguous target is filled through a copy
