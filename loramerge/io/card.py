"""The model card (README.md) written beside a merged adapter: recipe, inputs with checksums, version."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from loramerge.merging.engine import MergeResult


def model_card(result: MergeResult) -> str:
    from loramerge.version import __version__

    method = result.method
    base = result.config.get("base_model_name_or_path")
    front = {"library_name": "peft", "tags": ["loramerge", "lora", "merge", method.name]}
    if base:
        front["base_model"] = base
    recipe_yaml = yaml.safe_dump(result.recipe.model_dump(exclude_none=True), sort_keys=False)
    rows = []
    for adapter, entry in zip(result.adapters, result.recipe.adapters):
        rev = adapter.source.revision or ""
        rows.append(f"| {adapter.name} | `{adapter.source.reference}` | {rev} | {entry.weight:g} | "
                    f"{adapter.total_rank} | `{adapter.sha256}` |")
    ranks = sorted({m.rank for m in result.modules})
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        "# Merged LoRA adapter", "",
        f"Made with [loramerge](https://pypi.org/project/loramerge/) {__version__} using **{method.name}**: "
        f"{method.summary}.", "",
        f"Method: {method.paper} ({method.url}).",
        "Merge mode: factor-wise (PEFT add_weighted_adapter compatible, not a product-space merge)."
        if result.recipe.factorwise else "Merge mode: product space (delta_W = B @ A).", "",
        "## Inputs", "",
        "| name | source | revision | weight | total rank | sha256 of weights |",
        "|---|---|---|---|---|---|",
        *rows, "",
        "## Result", "",
        f"- modules: {len(result.modules)}; ranks: {', '.join(map(str, ranks))}",
        f"- relative reconstruction error of the rank policy ({result.recipe.rank_policy.describe()}): "
        f"mean {result.mean_rel_error:.3g}, max {result.max_rel_error:.3g}",
        f"- dtype: {str(result.dtype).replace('torch.', '')}", "",
        "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", "",
        "## Use", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/adapter')",
        "```", "",
    ]
    return "\n".join(lines)
