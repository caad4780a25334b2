"""Bad-input battery: recipes, weights, method parameters."""

from __future__ import annotations

import pytest

from loramerge import merge
from loramerge.errors import (
    RecipeError,
)
from loramerge.merging.recipe import load_recipe

from .helpers import (
    Q0,
    assert_user_error,
)

# ------------------------------------------------------------------------------------------------ recipes and weights


def test_average_with_weights_summing_to_zero(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, other], method="average", weights=[1.0, -1.0])
    assert_user_error(info.value, RecipeError, "average", "sum to zero", Q0, fix="weights")


def test_normalized_task_arithmetic_with_weights_summing_to_zero(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, other], method="task_arithmetic", weights=[0.5, -0.5],
              parameters={"normalize": True})
    assert_user_error(info.value, RecipeError, "task_arithmetic", Q0, fix="weights")


RECIPE_VALUE_CASES = [
    ("empty-adapter-list", {"adapters": []}, "adapters", "examples"),
    ("rank-zero", {"rank": 0}, "rank", "examples"),
    ("rank-negative", {"rank": -3}, "rank", "examples"),
    ("rank-word", {"rank": "everything"}, "rank", "examples"),
    ("dtype-typo", {"dtype": "bf16"}, "bfloat16", "examples"),
    ("weight-nan", {"adapters": [{"path": "PATH", "weight": float("nan")}]}, "finite", "examples"),
    ("weight-inf", {"adapters": [{"path": "PATH", "weight": float("inf")}]}, "finite", "examples"),
    ("parameter-wrong-type", {"parameters": {"lambda": "big"}}, "lambda", "loramerge methods"),
    # issue 14: YAML booleans are not numbers (``rank: true`` used to be read as rank 1)
    ("rank-true", {"rank": True}, "rank", "examples"),
    ("rank-false", {"rank": False}, "rank", "examples"),
    ("weight-true", {"adapters": [{"path": "PATH", "weight": True}]}, "weight", "examples"),
    ("seed-true", {"seed": True}, "seed", "examples"),
    ("weight-string", {"adapters": [{"path": "PATH", "weight": "heavy"}]}, "weight", "examples"),
    ("parameters-a-list", {"parameters": [1, 2]}, "parameters", "examples"),
]


@pytest.mark.parametrize("override,mention,fix", [c[1:] for c in RECIPE_VALUE_CASES],
                         ids=[c[0] for c in RECIPE_VALUE_CASES])
def test_bad_recipe_values(source_adapter, tmp_path, override, mention, fix):
    import yaml

    recipe = {"method": "task_arithmetic", "adapters": [{"path": str(source_adapter)}], **override}
    if recipe["adapters"] and recipe["adapters"][0].get("path") == "PATH":
        recipe["adapters"][0]["path"] = str(source_adapter)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), mention, fix=fix)


TYPO_CASES = [
    ("top-level-key", {"methd": "ties"}, "did you mean 'method'?"),
    ("adapter-key", {"adapters": [{"path": "PATH", "weigth": 0.5}]}, "did you mean 'weight'?"),
    ("parameter-key", {"method": "ties", "parameters": {"densty": 0.3}}, "did you mean 'density'?"),
    ("alias-parameter-key", {"parameters": {"lamda": 0.5}}, "did you mean 'lambda'?"),
    ("method-name", {"method": "tie"}, "did you mean 'ties'?"),
    ("method-alias", {"method": "linaer"}, "did you mean 'linear'?"),
]


@pytest.mark.parametrize("override,suggestion", [c[1:] for c in TYPO_CASES], ids=[c[0] for c in TYPO_CASES])
def test_recipe_typos_suggest_the_nearest_name(source_adapter, tmp_path, override, suggestion):
    import yaml

    recipe = {"method": "task_arithmetic", "adapters": [{"path": str(source_adapter)}], **override}
    if "methd" in recipe:
        del recipe["method"]
    for entry in recipe["adapters"]:
        if entry.get("path") == "PATH":
            entry["path"] = str(source_adapter)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), suggestion)


@pytest.mark.parametrize("content,mention,fix", [
    (None, "not found", "check the path"),
    ("method: ties\nadapters: [a, b\n", "not valid YAML", "YAML syntax"),
    ("- method: ties\n", "must be a mapping", "examples"),
], ids=["missing-file", "invalid-yaml", "not-a-mapping"])
def test_bad_recipe_files(tmp_path, content, mention, fix):
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), mention, fix=fix)


def test_duplicate_adapter_names(source_adapter, adapter_factory):
    other = adapter_factory(r=4)
    with pytest.raises(RecipeError) as info:
        merge({"method": "task_arithmetic", "adapters": [{"path": str(source_adapter), "name": "code"},
                                                          {"path": str(other), "name": "code"}]})
    assert_user_error(info.value, RecipeError, "'code'", fix="distinct name")


def test_same_adapter_listed_twice(source_adapter):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, source_adapter], method="task_arithmetic")
    assert_user_error(info.value, RecipeError, str(source_adapter), fix="raise its weight")


def test_weights_count_mismatch(source_adapter, adapter_factory):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter, adapter_factory(r=4)], method="task_arithmetic", weights=[1.0])
    assert_user_error(info.value, RecipeError, "1 weights for 2 adapters", fix="one weight per adapter")


def test_no_method(source_adapter):
    with pytest.raises(RecipeError) as info:
        merge(adapters=[source_adapter])
    assert_user_error(info.value, RecipeError, "no merge method", fix="method=")


def test_empty_adapter_list_in_python():
    with pytest.raises(RecipeError) as info:
        merge(adapters=[], method="task_arithmetic")
    assert_user_error(info.value, RecipeError, "adapters", fix="examples")


@pytest.mark.parametrize("text,mention", [
    ("method: ties\nadapters: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper"),
    ("method: ties\nparameters: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n", "nested deeper"),
    ("method: ties\nadapters:\n" + "- " * 2000 + "x\n", "nested deeper"),
    ("method: ties\nadapters:\n" + "- some/adapter\n" * 1_000_000, "at most"),
], ids=["flow-lists", "flow-mappings", "block-lists", "a-million-adapters"])
def test_pathological_yaml_is_refused_before_parsing(tmp_path, text, mention):
    """Found: deeply nested YAML exhausted the parser's recursion (a raw traceback). Capped before parsing."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), mention, fix="")


def test_recipe_that_is_not_text(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xff\xfe\x00method: ties")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert_user_error(info.value, RecipeError, str(path), fix="UTF-8")
