"""The example recipes parse and run as written against a demo-shaped tree of adapters."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from peft import PeftModel

from loramerge import load_recipe, merge
from loramerge.demo.toy import LLAMA_TARGETS, make_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def demo_tree(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for i, name in enumerate(("count", "colors", "animals", "code")):
        make_adapter(llama, root / "demo_out" / "adapters" / name, seed=100 + i, r=8, lora_alpha=16,
                     target_modules=LLAMA_TARGETS)
    shutil.copytree(EXAMPLES, root / "examples")
    return root


@pytest.mark.parametrize("recipe", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_recipe_runs(demo_tree, llama, recipe):
    parsed = load_recipe(demo_tree / "examples" / recipe)
    result = merge(parsed, demo_tree / "out" / recipe)
    assert result.output is not None
    PeftModel.from_pretrained(copy.deepcopy(llama), result.output)
