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
def demo_tree(llama, llama_dir, tmp_path_factory):
    from loramerge.data.calibration import calibrate
    from loramerge.demo.run import task_sequences

    root = tmp_path_factory.mktemp("tree")
    names = ("count", "colors", "animals", "code")
    for i, name in enumerate(names):
        make_adapter(llama, root / "demo_out" / "adapters" / name, seed=100 + i, r=8, lora_alpha=16,
                     target_modules=LLAMA_TARGETS)
    # regmean.yaml reads the statistics `loramerge calibrate` leaves in demo_out/calibration
    calibrate(llama_dir, {n: root / "demo_out" / "adapters" / n for n in names},
              {n: task_sequences(n, 4) for n in names}, root / "demo_out" / "calibration", show_progress=False)
    shutil.copytree(EXAMPLES, root / "examples")
    return root


@pytest.mark.parametrize("recipe", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_recipe_runs(demo_tree, llama, recipe):
    parsed = load_recipe(demo_tree / "examples" / recipe)
    result = merge(parsed, demo_tree / "out" / recipe)
    assert result.output is not None
    PeftModel.from_pretrained(copy.deepcopy(llama), result.output)
