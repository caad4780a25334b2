"""The one adapter-set loader, the name rules and the engine's streaming API."""

from __future__ import annotations

import shutil

import pytest
import torch

from loramerge.core.adapter import load_adapter
from loramerge.core.adapter_set import AdapterSet
from loramerge.core.names import check_name, natural_sorted, parse_pairs, parse_weights
from loramerge.errors import IncompatibleAdaptersError, RecipeError
from loramerge.merging.engine import MergePlan, merge, merge_modules


def test_names_are_unique_without_touching_the_callers_objects(adapter_factory, tmp_path):
    a = adapter_factory(r=4)
    b = tmp_path / "other" / a.name  # same directory name, different adapter
    shutil.copytree(adapter_factory(r=4), b)
    first, second = load_adapter(a), load_adapter(b)
    aset = AdapterSet.of([first, second])
    assert aset.names == (a.name, f"{a.name}-2")
    assert (first.name, second.name) == (a.name, a.name)  # the callers' objects are unchanged
    named = AdapterSet.of([first, second], names=["code", "c++"])
    assert named.names == ("code", "c++") and named["c++"].source.local_path == second.source.local_path
    assert first.name == a.name
    with pytest.raises(RecipeError, match="used twice"):
        AdapterSet.of([first, second], names=["x", "x"])
    with pytest.raises(RecipeError, match="listed twice"):
        AdapterSet.open([a, a])


def test_module_names_are_in_natural_order(adapter_factory, llama):
    from loramerge.demo.toy import tiny_llama

    deep = tiny_llama(seed=3, layers=12)
    aset = AdapterSet.open([adapter_factory(base=deep, r=2, target_modules=["q_proj"])])
    layers = [int(m.split(".")[2]) for m in aset.module_names]
    assert layers == list(range(12))
    assert natural_sorted(["l.10", "l.2", "l.1"]) == ["l.1", "l.2", "l.10"]


def test_compatibility_is_checked_once_with_file_module_and_fix(adapter_factory):
    from loramerge.demo.toy import tiny_llama

    a = adapter_factory(r=4)
    b = adapter_factory(base=tiny_llama(seed=1, hidden=32), r=4)
    with pytest.raises(IncompatibleAdaptersError) as info:
        AdapterSet.open([a, b])
    err = info.value
    assert err.module == "model.layers.0.self_attn.q_proj" and str(b) in err.path and "base model" in err.fix
    c = adapter_factory(r=4, base_name="org/other")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        AdapterSet.open([a, c])
    assert AdapterSet.open([a, c], base_model="org/other").base_model == "org/other"


def test_layers_to_transform_gives_exact_targets(adapter_factory):
    a = adapter_factory(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    aset = AdapterSet.open([a])
    assert aset.targets == list(aset.module_names) and all(".1." in m for m in aset.module_names)
    plan = MergePlan.build("task_arithmetic", [1.0], rank="exact")
    out = [m.module for m in merge_modules(aset, plan)]
    assert aset.lora_config(out)["target_modules"] == list(aset.module_names)


def test_engine_streams_what_merge_returns(three_adapters):
    aset = AdapterSet.open(three_adapters)
    plan = MergePlan.build("ties", [0.5, 0.3, 0.2], parameters={"density": 0.5}, rank={"energy": 0.99})
    streamed = list(merge_modules(aset, plan))
    result = merge(adapters=three_adapters, weights=[0.5, 0.3, 0.2], method="ties", parameters={"density": 0.5},
                   rank={"energy": 0.99})
    assert [m.module.name for m in streamed] == [m.name for m in result.modules] == list(aset.module_names)
    for got, want in zip(streamed, result.modules):
        torch.testing.assert_close(got.module.B @ got.module.A, want.B @ want.A)
        assert got.report.rank == want.rank
    with pytest.raises(RecipeError, match="weights for"):
        list(merge_modules(aset, MergePlan.build("average", [1.0])))
    with pytest.raises(RecipeError, match="density"):
        MergePlan.build("ties", [1.0], parameters={"density": "x"})


def test_name_rules_and_pair_parsing():
    assert check_name("c++") == "c++" and check_name("math-v2") == "math-v2"
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(RecipeError):
            check_name(bad)
    with pytest.raises(RecipeError, match="reserved"):
        check_name("shared", "task", reserved=("shared",))
    assert parse_pairs(["code=/a", "c++=/b=c"]) == {"code": "/a", "c++": "/b=c"}
    assert parse_pairs(["/x/math"], name_optional=True) == {"math": "/x/math"}
    with pytest.raises(RecipeError, match="NAME=PATH"):
        parse_pairs(["/x/math"])
    with pytest.raises(RecipeError, match="twice"):
        parse_pairs(["a=/x", "a=/y"])
    assert parse_weights("a=0.7, b=-0.3") == {"a": 0.7, "b": -0.3}
    with pytest.raises(RecipeError, match="name=0.7"):
        parse_weights("a=x")
