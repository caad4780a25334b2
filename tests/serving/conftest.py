"""Serving fixtures: a tiny Llama on disk and adapters under one root (names: code, math, chat, wide)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loramerge.demo.toy import make_adapter, save_base, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def serving_base(tmp_path_factory):
    """(model, directory): hidden 128, 4 heads, vocab 128, saved with its word-level tokenizer."""
    model = tiny_llama(seed=3, hidden=128)  # head_dim 32: a size vLLM's CPU attention supports
    with __import__("torch").no_grad():  # larger embeddings so greedy margins are not tiny
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    return model, save_base(model, tmp_path_factory.mktemp("serving-base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_root(serving_base, tmp_path_factory) -> Path:
    model, _ = serving_base
    root = tmp_path_factory.mktemp("served-adapters")
    make_adapter(model, root / "code", seed=41, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                 b_std=0.4)
    make_adapter(model, root / "math", seed=42, r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                 b_std=0.4)
    make_adapter(model, root / "chat", seed=43, r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"], b_std=0.4)
    make_adapter(model, root / "wide", seed=44, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], b_std=0.3)
    return root


class PeftOracle:
    """Greedy tokens from transformers + PEFT ``generate``, loading each adapter directory independently."""

    def __init__(self, base_dir: Path):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        self.base.generation_config.eos_token_id = None  # like vLLM's ignore_eos: EOS may appear, never stops
        self._models: dict[str | None, object] = {}

    def model(self, adapter_dir: Path | None):
        import copy

        from peft import PeftModel

        key = None if adapter_dir is None else str(adapter_dir)
        if key not in self._models:
            base = copy.deepcopy(self.base)
            self._models[key] = base if key is None else PeftModel.from_pretrained(base, key).eval()
        return self._models[key]

    def greedy(self, adapter_dir: Path | None, prompt_ids: list[int], n: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model(adapter_dir).generate(
                torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def oracle(serving_base) -> PeftOracle:
    return PeftOracle(serving_base[1])


PROMPTS = ["one two three", "the cat is red and the dog is blue", "write a python function", "add two numbers"]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
