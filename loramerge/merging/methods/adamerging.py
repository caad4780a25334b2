"""AdaMerging's static merge: learned task-wise and layer-wise coefficients folded into B.

AdaMerging (Yang et al., ICLR 2024) merges ``W0 + sum_t lambda_{t,l} dW_{t,l}`` with coefficients learned
on unlabeled inputs (entropy minimisation). Learning them needs a model forward, so it lives outside the
core (``loramerge.routers.adamerging``, on the gated concatenated LoRA); this method only applies them:
per module, the concatenation ``[lambda_1 w_1 B_1 | ... ] [A_1; ...]``, exact at rank sum r_t.

The coefficients are keyed by group (``coefficient_group``): ``"all"`` (task-wise), the transformer
block index (layer-wise, the paper's choice here: a LoRA layer is one block's projections) or the module
name, then by adapter name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loramerge.core.factored import concat_factors
from loramerge.merging.methods.base import Factored, MethodConfig, ModuleInputs
from loramerge.merging.methods.lines import layer_index

Granularity = Literal["task", "layer", "module"]


def coefficient_group(module: str, granularity: Granularity) -> str:
    """The key of ``module``'s coefficients: "all", the block index ("3"), or the module name.

    Modules outside the numbered blocks (embeddings, lm_head) get their own group at layer granularity.
    """
    if granularity == "task":
        return "all"
    if granularity == "layer":
        index = layer_index(module)
        if index is not None:
            return str(index)
    return module


class AdaMergingConfig(MethodConfig):
    coefficients: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="group -> adapter name -> lambda (written by `loramerge adamerging`)")
    granularity: Granularity = Field("layer", description="task (one lambda per adapter), layer (per block) or module")
    default: float | None = Field(None, description="lambda for groups or adapters not listed (None: an error)")


def adamerging(cfg: AdaMergingConfig, inputs: ModuleInputs) -> Factored:
    """sum_t w_t lambda_{t,g(module)} B_t A_t as the concatenated LoRA."""
    group = coefficient_group(inputs.name, cfg.granularity)
    table = cfg.coefficients.get(group, {})
    lambdas = []
    for name in inputs.adapter_names:
        if name in table:
            lambdas.append(float(table[name]))
        elif cfg.default is not None:
            lambdas.append(cfg.default)
        else:
            raise ValueError(f"no learned coefficient for adapter '{name}' in group '{group}' "
                             "(learn them with `loramerge adamerging`, or set parameters.default)")
    B, A = concat_factors(inputs.factors, [w * lam for w, lam in zip(inputs.weights, lambdas)])
    return Factored(B=B, A=A)
