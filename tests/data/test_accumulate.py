"""The calibration pass's building blocks against plain dense computations: the upper-triangle Gram sums (strips,
float32 partial sums flushed into float64, padding dropped), the adapted weights, the early stop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loramerge.data.accumulate import GramAccumulator, adapted, add_upper_gram, delta_hook, mirror_strips
from loramerge.data.calibration import collect, tokenize
from loramerge.demo.toy import make_tokenizer


@pytest.mark.parametrize(("d", "strip"), [(50, 16), (50, 50), (7, 3), (9, 384)])
def test_upper_gram_by_strips_equals_xtx(d, strip):
    rows = torch.randn(33, d, generator=torch.Generator().manual_seed(d))
    acc = torch.zeros(d, d)
    add_upper_gram(acc, rows, strip)
    add_upper_gram(acc, 2 * rows, strip)
    want = 5 * rows.double().T @ rows.double()
    assert (acc.tril(-strip).abs() == 0).all()  # below the diagonal blocks nothing was computed
    torch.testing.assert_close(mirror_strips(acc, strip).double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("flush_tokens", [5, 10**9])
def test_accumulator_drops_padding_flushes_and_shares_inputs(flush_tokens):
    gen = torch.Generator().manual_seed(0)
    q, k = nn.Linear(10, 4), nn.Linear(10, 4)
    acc = GramAccumulator(modules=["q", "k"], fisher=False, flush_tokens=flush_tokens, strip=3)
    handles = [q.register_forward_pre_hook(acc.pre_hook("q")), k.register_forward_pre_hook(acc.pre_hook("k"))]
    kept = []
    for lengths in ([4, 2], [3, 3], [1, 4]):  # padded and unpadded batches; flushes after the first two
        x = torch.randn(2, 4, 10, generator=gen) * 10
        mask = torch.zeros(2, 4, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
            kept.append(x[i, :n])
        acc.new_batch(mask)
        with torch.inference_mode():
            q(x), k(x)  # q and k read the same tensor: one Gram, owned by the first
        acc.recording = False
    for h in handles:
        h.remove()
    X = torch.cat(kept).double()
    assert acc.inputs == {"q": "q", "k": "q"} and acc.order == ["q", "k"] and acc.tokens == X.shape[0]
    if flush_tokens == 5:  # flushed after the first two batches: float64 totals
        assert acc._total and acc._pending == 5
        grams = acc.grams
        assert list(grams) == ["q"] and grams["q"].dtype == torch.float64 and not grams["q"].is_inference()
        torch.testing.assert_close(grams["q"], X.T @ X, rtol=1e-5, atol=1e-3)
    else:
        assert not acc._total
    means = acc.means()  # what calibrate stores: float32, from the totals or straight from the partial sums
    assert list(means) == ["q"] and means["q"].dtype == torch.float32
    torch.testing.assert_close(means["q"].double(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-4)


def test_adapted_weights_equal_the_hook_and_are_restored(llama):
    model = copy.deepcopy(llama)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    gen = torch.Generator().manual_seed(1)
    deltas = {}
    for n in names:
        w = model.get_submodule(n).weight
        deltas[n] = (torch.randn(3, w.shape[1], generator=gen), torch.randn(w.shape[0], 3, generator=gen) * 0.1)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: must not be changed in place
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 100, (2, 7), generator=gen)
    with torch.no_grad():
        handles = [model.get_submodule(n).register_forward_hook(delta_hook(*deltas[n])) for n in names]
        want = model(input_ids=ids).logits
        for h in handles:
            h.remove()
        with adapted(model, deltas):
            got = model(input_ids=ids).logits
            assert not torch.equal(model.get_submodule(names[0]).weight, before[names[0] + ".weight"])
            assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical afterwards


def test_the_pass_stops_after_the_last_recorded_module(llama):
    tok = make_tokenizer()
    tokens = tokenize(tok, ["the cat sat on the mat", "a dog", "one two three four five six seven"], 64)
    module = "model.layers.0.mlp.down_proj"
    runs = []
    handle = llama.model.layers[1].register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        acc = collect(llama, tokens, [module], batch_size=1, show_progress=False)
    finally:
        handle.remove()
    assert len(runs) == 1  # the first batch runs the whole model (to learn the order), later ones stop early
    X = []
    hook = llama.get_submodule(module).register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in tokens.ids:
            llama(input_ids=torch.tensor([row]))
    hook.remove()
    X = torch.cat(X).double()
    torch.testing.assert_close(acc.grams[module], X.T @ X, rtol=1e-5, atol=1e-5)
