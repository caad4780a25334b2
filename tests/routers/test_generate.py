"""Routed generation: one generate call for a batch whose prompts each run with their own composition."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramerge.errors import RecipeError
from loramerge.routers.gated import attach_gated_lora
from loramerge.routers.generate import generate_routed
from loramerge.routers.request import ArrowRouter, CentroidRouter, ClassifierRouter, PooledHiddenEmbedder

from .conftest import TASKS, labelled, task_texts


@pytest.fixture(scope="module")
def setup(task_world):
    model = task_world.fresh_model()
    controller = attach_gated_lora(model, task_world.paths, names=TASKS)
    embedder = PooledHiddenEmbedder(task_world.base, task_world.tokenizer, layer=1)  # the middle layer separates best
    prompts = [task_texts(t, 1, seed=21, length=(8, 8))[0] for t in TASKS]
    return model, controller, embedder, prompts


def _generate_alone(model, tokenizer, prompt, max_new_tokens):
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_top1_router_batch_equals_peft_generation_of_the_chosen_adapter(task_world, setup):
    model, controller, embedder, prompts = setup
    router = CentroidRouter.fit(labelled(20, seed=1), embedder)
    result = generate_routed(controller, task_world.tokenizer, prompts, router, max_new_tokens=5)
    chosen = [max(c, key=c.get) for c in result.compositions()]
    assert chosen == TASKS
    for prompt, name, text in zip(prompts, chosen, result.texts, strict=True):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(task_world.base), str(task_world.adapters[name])).eval()
        assert text == _generate_alone(peft_model, task_world.tokenizer, prompt, 5)
        assert text.split()[0] in " ".join(task_texts(name, 200, seed=0))  # continues in the task's vocabulary


def test_soft_mixtures_in_one_batch_equal_per_prompt_generation(task_world, setup):
    model, controller, embedder, prompts = setup
    router = ClassifierRouter.fit(labelled(20, seed=1), embedder)
    result = generate_routed(controller, task_world.tokenizer, prompts, router, max_new_tokens=5)
    assert result.weights.shape == (3, 3)
    for i, prompt in enumerate(prompts):
        with controller.use_weights(result.weights[i]):
            assert result.texts[i] == _generate_alone(model, task_world.tokenizer, prompt, 5)
    sampled = generate_routed(controller, task_world.tokenizer, prompts, router, max_new_tokens=3, do_sample=True,
                              num_return_sequences=2)
    assert len(sampled.texts) == 6  # the per-prompt gates follow generate's batch expansion
    assert torch.equal(controller.state.weights, controller.state.default)


def test_per_token_arrow_generation_and_fixed_weights(task_world, setup):
    model, controller, _, prompts = setup
    router = ArrowRouter.from_adapters(task_world.paths, names=TASKS)
    result = generate_routed(controller, task_world.tokenizer, prompts, router, max_new_tokens=4)
    assert result.weights is None and len(result.texts) == 3
    assert controller.gates() == {}  # the gates were removed after the call
    fixed = generate_routed(controller, task_world.tokenizer, prompts, weights={"code": 1.0}, max_new_tokens=4)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(task_world.base), str(task_world.adapters["code"])).eval()
    assert fixed.texts[0] == _generate_alone(peft_model, task_world.tokenizer, prompts[0], 4)
    with pytest.raises(RecipeError, match="not both"):
        generate_routed(controller, task_world.tokenizer, prompts, router, weights=[1.0, 0.0, 0.0])
