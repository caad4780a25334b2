"""Bad-input battery: adapter sets that do not fit together, or fit only partly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loramerge import load_adapter, merge
from loramerge.demo.toy import make_adapter, tiny_llama
from loramerge.errors import (
    IncompatibleAdaptersError,
)

from .helpers import (
    CONFIG,
    Q0,
    WEIGHTS,
    assert_user_error,
    dense_delta,
    merged_delta,
)

# ------------------------------------------------------------------------------------------------ incompatible sets

def test_different_base_models(adapter_factory):
    a = adapter_factory(r=4, base_name="org/base-one")
    b = adapter_factory(r=4, base_name="org/base-two")
    with pytest.raises(IncompatibleAdaptersError) as info:
        merge(adapters=[a, b], method="task_arithmetic")
    assert_user_error(info.value, IncompatibleAdaptersError, "org/base-one", "org/base-two", fix="base_model")


def test_different_base_names_accepted_when_the_recipe_says_so(adapter_factory):
    a = adapter_factory(r=4, base_name="org/base-one")
    b = adapter_factory(r=4, base_name="./local/base-one")
    result = merge(adapters=[a, b], method="task_arithmetic", base_model="org/base-one")
    assert result.config["base_model_name_or_path"] == "org/base-one"
    torch.testing.assert_close(merged_delta(result, Q0), dense_delta(a, Q0) + dense_delta(b, Q0))


def test_mismatched_shapes(adapter_factory, tmp_path):
    narrow = tiny_llama(seed=1, hidden=32)
    a = adapter_factory(r=4)
    b = make_adapter(narrow, tmp_path / "narrow", seed=3, r=4)  # same base name, other widths
    with pytest.raises(IncompatibleAdaptersError) as info:
        merge(adapters=[a, b], method="task_arithmetic")
    assert_user_error(info.value, IncompatibleAdaptersError, "shape mismatch", "64x64", "32x32",
                      str(b / WEIGHTS), fix="base model")


@pytest.mark.parametrize("targets_b", [["o_proj", "down_proj"], ["v_proj", "down_proj"]],
                         ids=["disjoint", "overlapping"])
def test_different_target_modules_merge_as_the_union(adapter_factory, targets_b, tmp_path):
    a = adapter_factory(r=4, target_modules=["q_proj", "v_proj"])
    b = adapter_factory(r=6, lora_alpha=12, target_modules=targets_b)
    result = merge(adapters=[a, b], method="task_arithmetic", weights=[0.7, 0.4], output=tmp_path / "out")
    mods_a, mods_b = set(load_adapter(a).modules), set(load_adapter(b).modules)
    assert {m.name for m in result.modules} == mods_a | mods_b
    for module in mods_a | mods_b:
        expected = sum(w * dense_delta(p, module) for p, w, mods in ((a, 0.7, mods_a), (b, 0.4, mods_b))
                       if module in mods)
        torch.testing.assert_close(merged_delta(result, module), expected, rtol=1e-5, atol=1e-6)
    cfg = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj", *targets_b}
    reloaded = load_adapter(tmp_path / "out")
    assert set(reloaded.modules) == mods_a | mods_b


def test_rank_beyond_the_dimension_is_merged_exactly(adapter_factory, llama, tmp_path):
    """r = 80 > d = 64 is a legal (rank-deficient) LoRA: it merges exactly, and PEFT loads the result."""
    from peft import PeftModel

    wide = adapter_factory(r=80, lora_alpha=80, target_modules=["q_proj"])
    small = adapter_factory(r=4, target_modules=["q_proj"])
    for rank in ("exact", 1000):
        result = merge(adapters=[wide, small], method="task_arithmetic", rank=rank)
        torch.testing.assert_close(merged_delta(result, Q0), dense_delta(wide, Q0) + dense_delta(small, Q0),
                                   rtol=1e-4, atol=1e-5)
    result.save(tmp_path / "out")
    model = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "out"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.get_delta_weight("default").double(), merged_delta(result, Q0),
                               rtol=1e-4, atol=1e-5)
