"""The transformers + PEFT reference engine: every composition's greedy tokens equal PEFT ``generate`` with
the composed adapter loaded on its own; mixed batches equal per-request runs; bounds are enforced."""

from __future__ import annotations

import asyncio

import pytest

from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.engine import GenerationRequest, SamplingOptions
from loramerge.serving.errors import CompositionError
from loramerge.serving.peft_engine import PeftEngine

MODELS = ["base", "code", "math", "mix:code=0.7,math=0.3", "mix:code=0.5,chat=-1.5,math=0.25;method=average",
          "wide"]
GREEDY = SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(serving_base, adapter_root, tmp_path_factory):
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=16, cache_dir=tmp_path_factory.mktemp("c"),
                        device="cpu")
    eng = PeftEngine(composer, serving_base[1])
    yield eng
    eng.close()


def test_every_composition_matches_peft_generate(engine, oracle, prompts):
    requests = [GenerationRequest(p, m, GREEDY) for m in MODELS for p in prompts[:2]]
    outputs = engine.generate(requests)  # one mixed batch
    for req, out in zip(requests, outputs, strict=True):
        built = engine.composer.build(engine.composer.resolve(engine.composer.parse(req.model)))
        path = built.adapter.path if built.adapter else None
        assert out.token_ids == oracle.greedy(path, out.prompt_token_ids, GREEDY.max_tokens), (req.model, req.prompt)
        assert out.composition["label"] == built.composition.label
    labels = {o.composition["label"] for o in outputs}
    assert len(labels) == len(MODELS)
    assert len({tuple(o.token_ids) for o in outputs}) > len(MODELS)  # compositions really differ


def test_mixed_batch_equals_single_requests(engine, prompts):
    requests = [GenerationRequest(p, m, GREEDY) for p, m in zip(prompts, ["base", "mix:code=1,math=1", "chat", "base"],
                                                                   strict=True)]
    batch = engine.generate(requests)
    singles = [engine.generate([r])[0] for r in reversed(requests)][::-1]
    assert [o.token_ids for o in batch] == [o.token_ids for o in singles]


def test_async_and_stream_agree_with_generate(engine, prompts):
    request = GenerationRequest(prompts[1], "mix:code=0.7,math=0.3", SamplingOptions(max_tokens=5, ignore_eos=True))
    want = engine.generate([request])[0]

    async def go():
        out = await engine.agenerate(request)
        composition, events = await engine.astream(request)
        pieces = [e async for e in events]
        return out, composition, pieces

    out, composition, pieces = asyncio.run(go())
    assert out.token_ids == want.token_ids and composition["label"] == "mix:code=0.7,math=0.3"
    assert [t for e in pieces for t in e.token_ids] == want.token_ids
    assert "".join(e.text for e in pieces) == want.text and pieces[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible(engine, prompts):
    opts = SamplingOptions(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate([GenerationRequest(prompts[0], "code", opts)] * 2)
    assert a.token_ids == b.token_ids


def test_leases_are_released(engine, prompts):
    engine.generate([GenerationRequest(prompts[0], "mix:code=0.1,math=0.2", GREEDY)])
    key = engine.composer.build(engine.composer.resolve(engine.composer.parse("mix:code=0.1,math=0.2"))).adapter.key
    assert engine.composer.cache.leases(key) == 0


@pytest.mark.parametrize("request_, needle", [
    (GenerationRequest("", "code"), "empty prompt"),
    (GenerationRequest("one " * 300, "code"), "tokens; the limit"),
    (GenerationRequest([1, 2, 999], "code"), "token ids"),
    (GenerationRequest("one", "code", SamplingOptions(max_tokens=0)), "max_tokens"),
    (GenerationRequest("one", "code", SamplingOptions(max_tokens=200)), "exceeds the model's context"),
    (GenerationRequest("one", "code", SamplingOptions(top_p=0.0)), "top_p"),
    (GenerationRequest("one", "ghost"), "unknown adapter"),
])
def test_bounds(engine, request_, needle):
    with pytest.raises(CompositionError, match=needle):
        engine.generate([request_])
