"""Served mixes of GPT-2 (Conv1D, ``fan_in_fan_out``) adapters and of adapters with ``layers_to_transform``
equal PEFT's own composition: both adapters loaded and active at once in one ``PeftModel``, each scaled
by its weight (PEFT sums active adapters' outputs). The composed directory is checked as written (config
and tensors) and as served (greedy tokens from the serving engine)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_gpt2

from loramerge.demo.toy import make_adapter, save_base
from loramerge.serving.catalog import AdapterCatalog
from loramerge.serving.composer import Composer
from loramerge.serving.engine import GenerationRequest, SamplingOptions
from loramerge.serving.peft_engine import PeftEngine


def peft_composition(base, adapters: dict[str, tuple]) -> torch.nn.Module:
    """PEFT's exact composition: every adapter active at once, each LoRA layer's scale times its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]][0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name][0]), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.scaling:
                    module.set_scale(name, adapters[name][1])
    return model.eval()


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(4, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def check_served_mix(base, base_dir, root, weights: dict[str, float], tmp_path, vocab: int) -> dict:
    from peft import PeftModel

    composer = Composer(AdapterCatalog(roots=[root]), cache_dir=tmp_path / "cache", device="cpu")
    engine = PeftEngine(composer, base_dir)
    try:
        model_field = "mix:" + ",".join(f"{n}={w}" for n, w in weights.items())
        built = composer.build(composer.resolve(composer.parse(model_field)))
        config = json.loads((built.adapter.path / "adapter_config.json").read_text())
        oracle = peft_composition(base, {n: (root / n, w) for n, w in weights.items()})
        plain = logits(base, vocab)
        want = logits(oracle, vocab)
        assert (want - plain).abs().max() > 1e-2  # the adapters change the output: the check can fail
        composed = PeftModel.from_pretrained(copy.deepcopy(base), str(built.adapter.path)).eval()
        torch.testing.assert_close(logits(composed, vocab), want, rtol=1e-4, atol=1e-4)
        prompt = [5, 9, 17, 33, 41]
        out = engine.generate([GenerationRequest(prompt=prompt, model=model_field,
                                                 options=SamplingOptions(max_tokens=6, ignore_eos=True))])[0]
        oracle.generation_config.eos_token_id = None
        assert out.token_ids == greedy(oracle, prompt, 6)
        return config
    finally:
        engine.close()


def test_gpt2_conv1d_mix_equals_peft(tmp_path):
    base = tiny_gpt2(seed=5)
    base.generation_config.eos_token_id = None
    with torch.no_grad():
        base.transformer.wte.weight.normal_(0, 1.0)  # clear greedy margins
    base_dir = save_base(base, tmp_path / "gpt2")
    root = tmp_path / "adapters"
    make_adapter(base, root / "attn", seed=1, r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                 base_name="tiny-gpt2", b_std=0.3)
    make_adapter(base, root / "mlp", seed=2, r=8, target_modules=["c_fc", "c_attn"], fan_in_fan_out=True,
                 base_name="tiny-gpt2", b_std=0.3)
    config = check_served_mix(base, base_dir, root, {"attn": 0.7, "mlp": -0.4}, tmp_path, vocab=90)
    assert config["fan_in_fan_out"] is True


def test_layers_to_transform_mix_equals_peft(serving_base, tmp_path):
    base, base_dir = serving_base
    root = tmp_path / "adapters"
    make_adapter(base, root / "low", seed=3, r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                 b_std=0.4)
    make_adapter(base, root / "high", seed=4, r=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                 b_std=0.4)
    config = check_served_mix(base, base_dir, root, {"low": 0.8, "high": 0.6}, tmp_path, vocab=120)
    # exactly the modules the inputs have: PEFT must not add empty LoRA layers elsewhere
    assert sorted(config["target_modules"]) == sorted([
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"])


@pytest.mark.parametrize("weights", [{"low": 1.0, "high": 0.0}])
def test_single_term_of_a_layers_to_transform_adapter_is_its_own_directory(serving_base, tmp_path, weights):
    base, _ = serving_base
    root = tmp_path / "adapters"
    make_adapter(base, root / "low", seed=3, r=8, target_modules=["q_proj"], layers_to_transform=[0])
    make_adapter(base, root / "high", seed=4, r=4, target_modules=["q_proj"], layers_to_transform=[1])
    composer = Composer(AdapterCatalog(roots=[root]), cache_dir=tmp_path / "c", device="cpu")
    built = composer.build(composer.resolve(composer.parse({"adapters": weights})))
    assert built.adapter.path == (root / "low").resolve()
    composer.close()
