"""Bad-input battery: adapter sets that do not fit together, or fit only partly."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

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
    edit_config,
    edit_tensors,
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


# ------------------------------------------------------------------------------------------------ missing modules
# An adapter that lacks a module is a ZERO task vector there (model-soup semantics): every method must give
# the same module as when that adapter holds the module with A = B = 0. Found: average renormalised over the
# adapters holding the module, so a module of one adapter in two got that adapter's whole delta.

V0 = "model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def holey_set(adapter_factory, tmp_path_factory) -> dict[str, Path]:
    """a, c on q and v; b on q only ("missing"), and b with v present but zero ("zero"): the oracle."""
    root = tmp_path_factory.mktemp("holey")
    full = adapter_factory(seed=202, r=4, target_modules=["q_proj", "v_proj"])
    zero, missing = Path(shutil.copytree(full, root / "zero")), Path(shutil.copytree(full, root / "missing"))

    def zero_v(t):
        for key in t:
            if "v_proj.lora_" in key:
                t[key].zero_()

    edit_tensors(zero, zero_v)
    edit_tensors(missing, lambda t: [t.pop(k) for k in [k for k in t if "v_proj" in k]])
    edit_config(missing, target_modules=["q_proj"])
    a = adapter_factory(seed=201, r=4, target_modules=["q_proj", "v_proj"])
    return {"a": a, "zero": zero, "missing": missing, "a-copy": Path(shutil.copytree(a, root / "a-copy")),
            "c": adapter_factory(seed=203, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"])}


def _method_cases():
    from loramerge.merging.methods import REGISTRY

    return [(name, fw) for name, m in sorted(REGISTRY.items()) for fw in ([False, True] if m.factorwise else [False])
            if not (fw and name in ("dare_linear", "dare_ties")) and m.data in ("none", "prompts")]


def _run(name: str, adapters: list, factorwise: bool = False, weights=(0.5, 0.8, 0.3)):
    from loramerge.merging.methods import get_method

    exact = {} if get_method(name).fixed_rank else {"rank": "exact"}
    # learned-coefficient methods take their coefficients as parameters (a default lambda here); the
    # statistics-based methods (regmean, fisher) have their own missing-module tests beside them
    params = {"iso_cts": {"rank": 10}, "adamerging": {"coefficients": {"0": {"a": 0.7}}, "default": 1.3}}.get(name, {})
    # c has rank 6, the others 4: factor-wise (PEFT) merges need equal ranks, so they merge a, b, a-copy.
    return merge(adapters=adapters, method=name, weights=list(weights)[:len(adapters)], factorwise=factorwise,
                 seed=7, parameters=params, **exact)


@pytest.mark.parametrize("name,factorwise", _method_cases(), ids=lambda v: str(v))
def test_missing_module_is_a_zero_task_vector(holey_set, name, factorwise):
    third = holey_set["a-copy" if factorwise else "c"]

    def entries(b: Path) -> list:
        return [str(holey_set["a"]), {"path": str(b), "name": "b"}, str(third)]  # one name: same DARE masks

    got = _run(name, entries(holey_set["missing"]), factorwise)
    want = _run(name, entries(holey_set["zero"]), factorwise)
    assert {m.name for m in got.modules} == {m.name for m in want.modules}
    for module in (Q0, V0):
        torch.testing.assert_close(merged_delta(got, module), merged_delta(want, module), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_missing_module_factorwise_dare_is_peft_skipping(holey_set, name):
    """PEFT's factor-wise DARE skips an adapter without the module (its zero A, B add nothing but would
    shift the random stream): v equals the merge of the two adapters that have it."""
    a, b, c = holey_set["a"], holey_set["missing"], holey_set["a-copy"]
    got = _run(name, [str(a), str(b), str(c)], True)
    want = _run(name, [str(a), str(c)], True, weights=(0.5, 0.3))
    torch.testing.assert_close(merged_delta(got, V0), merged_delta(want, V0), rtol=1e-5, atol=1e-7)


def test_average_missing_module_dense_reference(holey_set):
    """The issue's case, against a dense formula: (w_a dW_a + w_b * 0 + w_c dW_c) / (w_a + w_b + w_c)."""
    a, b, c = holey_set["a"], holey_set["missing"], holey_set["c"]
    result = merge(adapters=[a, b, c], method="average", weights=[0.5, 0.8, 0.3])
    expected = (0.5 * dense_delta(a, V0) + 0.3 * dense_delta(c, V0)) / 1.6
    torch.testing.assert_close(merged_delta(result, V0), expected, rtol=1e-5, atol=1e-7)
    two = merge(adapters=[a, b], method="average")
    torch.testing.assert_close(merged_delta(two, V0), dense_delta(a, V0) / 2, rtol=1e-5, atol=1e-7)
