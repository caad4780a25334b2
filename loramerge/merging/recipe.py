"""YAML merge recipes, validated with messages that point at the key and suggest the fix.

```yaml
method: ties
base_model: my-org/base       # optional; checked against the adapters
adapters:
  - {path: ./code, weight: 0.7}
  - {path: user/math-lora, weight: 0.3, revision: main}
parameters: {density: 0.2}
rank: exact                   # exact | auto | max | 16 | {energy: 0.99}
dtype: auto                   # auto | float32 | float16 | bfloat16
space: dense                  # dense (default) | core (core-space merging, arXiv 2509.17786)
```
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loramerge.core.rank import RankPolicy
from loramerge.errors import RecipeError

NEEDS_STATISTICS = ("gram", "fisher", "model")
"""``MergeMethod.data`` values whose statistics the engine builds from ``calibration:`` / ``data:`` (issue 11)."""

DTypeName = Literal["auto", "float32", "float16", "bfloat16"]


class AdapterEntry(BaseModel):
    """One input adapter: a local directory or a hub id, with its weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    weight: float = 1.0
    name: str | None = None
    revision: str | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("weight must be a number, not a boolean")
        return v

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("weight must be a finite number")
        return v


class Recipe(BaseModel):
    """A merge recipe (mergekit-like)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    adapters: list[AdapterEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    rank: str | int | dict[str, float] = "auto"
    dtype: DTypeName = "auto"
    base_model: str | None = None
    factorwise: bool = False
    space: Literal["dense", "core"] = "dense"
    seed: int = 0
    allow_pickle: bool = False
    calibration: str | None = None  # data-informed methods: a `loramerge calibrate` directory
    data: str | dict[str, str | list[str]] | None = None  # ... or texts per adapter (files or inline lists),
    # calibrated on the fly (needs base_model)
    post: str | dict[str, Any] | None = None  # a post-step on every merged delta: `lines` (LiNeS)

    @field_validator("adapters", mode="before")
    @classmethod
    def _plain_paths(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"path": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_parses(cls, v: Any) -> Any:
        RankPolicy.parse(v)  # refuses booleans (``rank: true`` is not rank 1)
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("seed must be an integer, not a boolean")
        return v

    @model_validator(mode="after")
    def _method_and_parameters(self) -> Recipe:
        from loramerge.merging.methods import get_method
        from loramerge.merging.methods.catalog import FACTORWISE_METHODS

        method = get_method(self.method)
        try:
            method.make_config(self.parameters)
        except ValidationError as exc:
            raise RecipeError(_explain(exc, f"parameters of method '{method.name}'",
                                       list(method.config_cls.model_fields) + _aliases(method.config_cls)),
                              fix="`loramerge methods` lists each method's parameters and defaults") from exc
        if method.data in NEEDS_STATISTICS and self.calibration is None and self.data is None:
            raise RecipeError(f"method '{method.name}' learns from data ({method.data} statistics), and the recipe "
                              "gives none", fix="add `calibration: DIR` (from `loramerge calibrate`) or "
                              "`data: {adapter_name: texts.jsonl}` with `base_model: DIR`")
        if method.data == "model" and (self.data is None or self.base_model is None):
            raise RecipeError(f"method '{method.name}' runs the partially merged model: it needs `data:` and "
                              "`base_model:`", fix="add `data: {adapter_name: texts.jsonl}` and `base_model: DIR`")
        if self.post is not None:
            from loramerge.merging.methods.lines import build_post

            try:
                build_post(self.post, [])
            except ValidationError as exc:
                raise RecipeError(_explain(exc, "post-step parameters", ["alpha", "beta", "num_layers"]),
                                  fix="post: {lines: {alpha: 0.5, beta: 0.5}}") from exc
        if self.factorwise and method.factorwise is None:
            raise RecipeError(f"method '{method.name}' has no factorwise (PEFT) variant",
                              fix=f"factorwise works with {', '.join(FACTORWISE_METHODS)}")
        from loramerge.merging.methods.core_space import check_space

        check_space(method, self.space, factorwise=self.factorwise)
        return self

    @property
    def rank_policy(self) -> RankPolicy:
        return RankPolicy.parse(self.rank)


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias for f in model.model_fields.values() if f.alias]


def _explain(exc: ValidationError, where: str, valid: list[str]) -> str:
    lines = [f"invalid {where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(set(valid)))}"
            lines.append(f"  unknown key '{loc}'{hint}")
        else:
            lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_recipe(data: Any, *, base_dir: Path | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe dict; relative adapter paths resolve against ``base_dir`` when they exist there."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping with keys method, adapters, ...", path=source,
                          fix="see examples/*.yaml for the format")
    try:
        recipe = Recipe(**data)
    except RecipeError as exc:
        exc.path = exc.path or source
        raise RecipeError(exc.message, path=source, fix=exc.fix) from None
    except ValidationError as exc:
        raise RecipeError(_explain(exc, "recipe", list(Recipe.model_fields) + list(AdapterEntry.model_fields)),
                          path=source, fix="see examples/*.yaml for the format") from None
    if base_dir is None:
        return recipe
    adapters = []
    for entry in recipe.adapters:
        candidate = (base_dir / entry.path).expanduser()
        if not Path(entry.path).is_absolute() and candidate.exists():
            entry = entry.model_copy(update={"path": str(candidate.resolve())})
        adapters.append(entry)
    update: dict[str, Any] = {"adapters": adapters}
    if recipe.calibration is not None:  # relative to the recipe, like the adapters (it may not exist yet)
        update["calibration"] = str((base_dir / recipe.calibration).expanduser()) if not Path(
            recipe.calibration).is_absolute() else recipe.calibration
    if isinstance(recipe.data, dict):
        update["data"] = {k: _near(base_dir, v) if isinstance(v, str) else v for k, v in recipe.data.items()}
    elif recipe.data is not None:
        update["data"] = _near(base_dir, recipe.data)
    return recipe.model_copy(update=update)


def _near(base_dir: Path, path: str) -> str:
    candidate = (base_dir / path).expanduser()
    return str(candidate.resolve()) if not Path(path).is_absolute() and candidate.exists() else path


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32


def _check_yaml_shape(text: str, path: Path) -> None:
    """Refuse what could exhaust the parser before parsing: a huge file, or deeply nested flow collections."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is {len(text):,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}", path=str(path),
                          fix="a recipe lists adapters and parameters only; check that this is the right file")
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    indent = max((len(line) - len(line.lstrip(" -")) for line in text.splitlines()), default=0)
    if deepest > MAX_RECIPE_DEPTH or indent > 4 * MAX_RECIPE_DEPTH:
        raise RecipeError(f"recipe is nested deeper than {MAX_RECIPE_DEPTH} levels", path=str(path),
                          fix="a recipe has at most a few levels (adapters: [{path, weight}], parameters: {...})")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", path=str(path), fix="check the path to the YAML recipe")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe cannot be read as text: {exc}", path=str(path),
                          fix="a recipe is a UTF-8 YAML file") from exc
    _check_yaml_shape(text, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe is not valid YAML: {exc}", path=str(path), fix="fix the YAML syntax") from exc
    except RecursionError as exc:
        raise RecipeError("recipe is nested too deeply to parse", path=str(path),
                          fix="a recipe has at most a few levels of nesting") from exc
    return parse_recipe(data, base_dir=path.parent, source=str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(exclude_defaults=False, exclude_none=True), sort_keys=False)
