"""Shared fixtures: a tiny Llama and GPT-2 built from configs, adapters made with PEFT (non-zero B)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2

from loramerge.demo.toy import make_adapter, save_base, tiny_llama

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def llama_dir(llama, tmp_path_factory) -> Path:
    return save_base(llama, tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def gpt2():
    return tiny_gpt2(seed=0)


@pytest.fixture(scope="session")
def adapter_factory(llama, tmp_path_factory):
    """make(seed=..., r=..., **LoraConfig kwargs) -> a saved adapter directory (tiny Llama base)."""
    root = tmp_path_factory.mktemp("adapters")
    counter = itertools.count()

    def make(*, base=None, **kwargs) -> Path:
        kwargs.setdefault("seed", next(counter))
        return make_adapter(base if base is not None else llama, root / f"adapter-{next(counter)}", **kwargs)

    return make


@pytest.fixture(scope="session")
def three_adapters(adapter_factory) -> list[Path]:
    """Three adapters with ranks 4, 6, 8, different alphas, partly different target modules."""
    return [
        adapter_factory(seed=11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        adapter_factory(seed=12, r=6, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
        adapter_factory(seed=13, r=8, lora_alpha=32, target_modules=["q_proj", "o_proj", "down_proj"]),
    ]


@pytest.fixture(scope="session")
def equal_rank_adapters(adapter_factory) -> list[Path]:
    """Three rank-4 adapters on the same modules (what PEFT's factor-wise merges need)."""
    return [adapter_factory(seed=20 + i, r=4, lora_alpha=4 + 4 * i, target_modules=["q_proj", "v_proj"]) for i in range(3)]
